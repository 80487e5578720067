"""The bottom layer: the internal request/result types and tokenized work items every layer passes along."""
