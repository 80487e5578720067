"""NIM's gRPC API: the Open Inference Protocol (KServe V2) `GRPCInferenceService`, beside HTTP (`--grpc-port`).

protocol/ holds the .proto and its generated stubs (scripts/gen_grpc_stubs.sh), tensors.py the tensor
encoding, ranking.py the reranking model's inputs and outputs, service.py the RPCs, server.py the server.
"""
