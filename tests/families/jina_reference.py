"""An independent jina-reranker-v3 reference, written from the model card's `modeling.py` (`JinaForRanking`).

Nothing here comes from openrerank: the prompt, the marker readout, the truncation, the block split and the
merge across blocks are re-stated from the reference code, so a mistake on either side shows as a mismatch.
Three deliberate mistakes are switchable, for the negative controls: reading one position before each marker,
attending bidirectionally instead of causally, and moving each block's boundary by one passage.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, Qwen3ForCausalLM

DOC_MARKER = "<|embed_token|>"
QUERY_MARKER = "<|rerank_token|>"
BLOCK_SIZE = 125


def sanitize_input(text: str, special_tokens: dict[str, str]) -> str:
    for token in special_tokens.values():
        text = text.replace(token, "")
    return text


def format_docs_prompts_func(query: str, docs: list[str], instruction: str | None = None) -> str:
    special_tokens = {"query_embed_token": QUERY_MARKER, "doc_embed_token": DOC_MARKER}
    query = sanitize_input(query, special_tokens)
    docs = [sanitize_input(doc, special_tokens) for doc in docs]
    prefix = (
        "<|im_start|>system\n"
        "You are a search relevance expert who can determine a ranking of the passages based on how relevant they "
        "are to the query. "
        "If the query is a question, how relevant a passage is depends on how well it answers the question. "
        "If not, try to analyze the intent of the query and assess how well each passage satisfies the intent. "
        "If an instruction is provided, you should follow the instruction when determining the ranking."
        "<|im_end|>\n<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prompt = (f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
              f"Rank the passages based on their relevance to query: {query}\n")
    if instruction:
        prompt += f"<instruct>\n{instruction}\n</instruct>\n"
    doc_prompts = [f'<passage id="{i}">\n{doc}{DOC_MARKER}\n</passage>' for i, doc in enumerate(docs)]
    prompt += "\n".join(doc_prompts) + "\n"
    prompt += f"<query>\n{query}{QUERY_MARKER}\n</query>"
    return prefix + prompt + suffix


class JinaForRanking(Qwen3ForCausalLM):
    """The card's class: the causal LM with an identity head and the projector MLP (dimension from the files)."""

    projector_dim = 512

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(config.hidden_size, config.hidden_size // 2, bias=False),
            nn.ReLU(),
            nn.Linear(config.hidden_size // 2, self.projector_dim, bias=False),
        )
        self.post_init()


class Reference:
    """`JinaForRanking.rerank` and the helpers it calls, with switchable mistakes."""

    def __init__(self, model_dir, projector_dim: int, *, shift: int = 0, bidirectional: bool = False,
                 boundary: int = 0) -> None:
        JinaForRanking.projector_dim = projector_dim
        self.model = JinaForRanking.from_pretrained(model_dir, tie_word_embeddings=False).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.doc_id = self.tok.convert_tokens_to_ids(DOC_MARKER)
        self.query_id = self.tok.convert_tokens_to_ids(QUERY_MARKER)
        self.shift = shift  # read `shift` positions before each marker (0: the reference)
        self.bidirectional = bidirectional  # full attention instead of the causal mask (False: the reference)
        self.boundary = boundary  # close each block `boundary` passages early (0: the reference)
        self.blocks: list[list[str]] = []  # what the last rerank() put in each block

    def prompt_ids(self, query: str, docs: list[str], instruction: str | None = None) -> list[int]:
        return self.tok(text=[format_docs_prompts_func(query, docs, instruction)])["input_ids"][0]

    @torch.no_grad()
    def forward(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc embeddings, query embedding, cosines) of one prompt, as `JinaForRanking.forward`."""
        input_ids = torch.tensor([ids])
        kwargs = {}
        if self.bidirectional:
            kwargs["attention_mask"] = torch.ones(1, 1, len(ids), len(ids), dtype=torch.bool)
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-1]
        doc_pos = torch.nonzero(input_ids[0] == self.doc_id)[:, 0] - self.shift
        query_pos = torch.nonzero(input_ids[0] == self.query_id)[:, 0] - self.shift
        doc_embeds = self.model.projector(hidden[0, doc_pos])
        query_embeds = self.model.projector(hidden[0, query_pos])
        scores = torch.nn.functional.cosine_similarity(doc_embeds, query_embeds.expand_as(doc_embeds), dim=-1)
        return doc_embeds.float().numpy(), query_embeds[0].float().numpy(), scores.float().numpy()

    def _truncate_texts(self, query, documents, max_query_length, max_doc_length):
        docs, doc_lengths = [], []
        for doc in documents:
            doc_tokens = self.tok(doc, truncation=True, max_length=max_doc_length)
            if len(doc_tokens["input_ids"]) >= max_doc_length:
                doc = self.tok.decode(doc_tokens["input_ids"])
            doc_lengths.append(len(doc_tokens["input_ids"]))
            docs.append(doc)
        query_tokens = self.tok(query, truncation=True, max_length=max_query_length)
        if len(query_tokens["input_ids"]) >= max_query_length:
            query = self.tok.decode(query_tokens["input_ids"])
        return query, docs, doc_lengths, len(query_tokens["input_ids"])

    def rerank(self, query: str, documents: list[str], *, max_doc_length: int, max_query_length: int,
               instruction: str | None = None) -> np.ndarray:
        """Scores in document order (the card returns them sorted; the order is all that differs)."""
        max_length = self.tok.model_max_length
        query, docs, doc_lengths, query_length = self._truncate_texts(query, documents, max_query_length,
                                                                      max_doc_length)
        self.blocks = []
        doc_embeddings, query_embeddings, block_weights = [], [], []

        def run(block_docs):
            self.blocks.append(list(block_docs))
            d, q, s = self.forward(self.prompt_ids(query, block_docs, instruction))
            doc_embeddings.extend(d)
            query_embeddings.append(q)
            block_weights.append(((1.0 + s) / 2.0).max())

        length_capacity = max_length - 2 * query_length
        block_docs: list[str] = []
        for length, doc in zip(doc_lengths, docs, strict=True):
            if self.boundary and block_docs and length_capacity - length <= max_doc_length:
                run(block_docs)  # the mistake: close the block before the passage that fills it
                block_docs, length_capacity = [], max_length - 2 * query_length
            block_docs.append(doc)
            length_capacity -= length
            if len(block_docs) >= BLOCK_SIZE or length_capacity <= max_doc_length:
                run(block_docs)
                block_docs, length_capacity = [], max_length - 2 * query_length
        if block_docs:
            run(block_docs)
        q = np.average(np.array(query_embeddings), axis=0, weights=block_weights)
        doc_embeddings = np.array(doc_embeddings)
        return np.dot(q, doc_embeddings.T) / (np.linalg.norm(q) * np.linalg.norm(doc_embeddings, axis=1))
