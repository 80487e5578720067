"""jina-reranker-v3: a listwise reranker ("last but not late" interaction) on a Qwen3 body.

The query and up to 125 passages share one causal prompt; each passage ends with `<|embed_token|>`, the query
(repeated at the end) with `<|rerank_token|>`. The final hidden state (after the last norm) at each marker goes
through the projector (`Linear(h, h/2) - ReLU - Linear(h/2, d)`, no bias) and a passage's score is the cosine
of its vector with the query's (`ScoreKind.COSINE`, in [-1, 1]; unit form (cos + 1) / 2).

Reference followed: the model card's `modeling.py` (`JinaForRanking.rerank`): its prompt byte for byte, its
truncation (query 512, passage 2048 tokens), its block split and its merge across blocks (`text/listwise.py`).
vLLM's port (`JinaForRanking` + `JinaRankingIOProcessor`) reads the same markers through the same projector but
puts every passage into one prompt and has no block merge; both give the same scores when a request fits in
one block. No remote code runs: the body is transformers' own `Qwen3Model` and the projector's two matrices
are read from the safetensors files. The marker ids are looked up in the tokenizer (151670 / 151671 in the
published vocabulary).

The request's own instruction (`instruction` field, or `--instruction`) goes where the reference's
`format_docs_prompts_func` puts one: `<instruct>...</instruct>` after the first mention of the query. The
published `rerank()` passes none, which is the default.
"""

from __future__ import annotations

import json
from pathlib import Path

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.listwise_scorer import ListwiseScorer
from openrerank.runtimes.base import Network, NetworkBuild
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.sources.safety import weights_kwargs
from openrerank.text.listwise import ListwiseLimits, ListwiseTextEncoder

ARCHITECTURE = "JinaForRanking"
DOC_MARKER = "<|embed_token|>"
QUERY_MARKER = "<|rerank_token|>"
SYSTEM = ("<|im_start|>system\nYou are a search relevance expert who can determine a ranking of the passages based "
          "on how relevant they are to the query. If the query is a question, how relevant a passage is depends on "
          "how well it answers the question. If not, try to analyze the intent of the query and assess how well "
          "each passage satisfies the intent. If an instruction is provided, you should follow the instruction "
          "when determining the ranking.<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PROJECTOR = ("projector.0.weight", "projector.2.weight")
#: The reference `rerank()`'s limits: passages per block, tokens per passage, tokens of the query.
BLOCK_SIZE = 125
DOC_TOKENS = 2048
QUERY_TOKENS = 512


def render(query: str, docs: list[str], instruction: str | None = None) -> str:
    """The reference's prompt for one block (`format_docs_prompts_func`, no_thinking=True)."""
    prompt = (f"I will provide you with {len(docs)} passages, each indicated by a numerical identifier. "
              f"Rank the passages based on their relevance to query: {query}\n")
    if instruction:
        prompt += f"<instruct>\n{instruction}\n</instruct>\n"
    prompt += "\n".join(f'<passage id="{i}">\n{doc}{DOC_MARKER}\n</passage>' for i, doc in enumerate(docs)) + "\n"
    prompt += f"<query>\n{query}{QUERY_MARKER}\n</query>"
    return SYSTEM + prompt + SUFFIX


def limits_for(context: int) -> ListwiseLimits:
    """The reference's limits, scaled down for windows far below the published 131,072 tokens (a passage at
    most a quarter of a block, the query a sixteenth), so a small `--max-length` still splits sensibly."""
    return ListwiseLimits(context=context, doc_window=min(DOC_TOKENS, context // 4),
                          query_window=min(QUERY_TOKENS, context // 16), block_size=BLOCK_SIZE)


def _weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _tokenizer_tokens(files: ModelFiles) -> set[str]:
    """Added-token strings the tokenizer files declare (tokenizer.json and tokenizer_config.json)."""
    found: set[str] = set()
    raw = files.path / "tokenizer.json"
    if raw.is_file():
        try:
            data = json.loads(raw.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelFormatError(f"{raw} is not valid JSON: {exc}") from exc
        found |= {str(t.get("content")) for t in data.get("added_tokens", []) if isinstance(t, dict)}
    decoder = files.tokenizer_config.get("added_tokens_decoder") or {}
    found |= {str(t.get("content")) for t in decoder.values() if isinstance(t, dict)}
    return found


def _build(spec: ModelSpec, markers: tuple[int, int], build: NetworkBuild):
    import torch
    from safetensors import safe_open
    from transformers import Qwen3Model

    body = Qwen3Model.from_pretrained(str(spec.path), dtype=torch_dtype(build.dtype), local_files_only=True,
                                      **weights_kwargs(spec.path))
    files = _weight_files(spec.path)
    weights = []
    for name in PROJECTOR:
        with safe_open(str(files[name]), framework="pt") as f:
            weights.append(f.get_tensor(name).float())
    slots = int(spec.options["block_size"]) + 1

    class MarkerReadout(torch.nn.Module):
        """(input_ids, attention_mask) -> projected marker states `(batch, slots, dim)` float32: each row's
        markers in prompt order (passages, then the query), zero past its own count."""

        input_names = ("input_ids", "attention_mask")

        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.register_buffer("down", weights[0])  # (h/2, h)
            self.register_buffer("out", weights[1])  # (d, h/2)
            self.register_buffer("markers", torch.tensor(markers))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            marked = torch.isin(input_ids, self.markers) & attention_mask.bool()
            width = input_ids.shape[1]
            position = torch.arange(width, device=input_ids.device).expand_as(input_ids)
            order = torch.where(marked, position, position + width).argsort(dim=1)[:, : min(slots, width)]
            picked = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            valid = marked.gather(1, order).unsqueeze(-1)
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                vectors = torch.relu(picked.float() @ self.down.T) @ self.out.T
            vectors = vectors * valid
            if vectors.shape[1] < slots:
                vectors = torch.nn.functional.pad(vectors, (0, 0, 0, slots - vectors.shape[1]))
            return vectors

    return MarkerReadout()


class JinaRerankerV3Family(Family):
    id = "jina-reranker-v3"
    title = "jina-reranker-v3 (listwise: query and passages in one Qwen3 prompt)"
    input_format = (SYSTEM + "I will provide you with {n} passages, ... query: {query}\\n"
                    "<passage id=\"0\">\\n{passage}" + DOC_MARKER + "\\n</passage>\\n...<query>\\n{query}"
                    + QUERY_MARKER + "\\n</query>" + SUFFIX).encode("unicode_escape").decode()
    readout = ("cosine(P(h at <|rerank_token|>), P(h at each passage's <|embed_token|>)), P = the projector MLP; "
               "blocks of up to 125 passages merged as the reference does")
    score_kind = ScoreKind.COSINE
    runtimes = ("torch",)
    examples = ("jinaai/jina-reranker-v3",)
    takes_instruction = True
    listwise = True

    def matches(self, files: ModelFiles) -> bool:
        return ARCHITECTURE in files.architectures

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        if files.model_type != "qwen3":
            raise ModelFormatError(f"{files.path}: {self.id} needs a Qwen3 body (config model_type qwen3), found "
                                   f"{files.model_type}")
        missing = [name for name in PROJECTOR if name not in _weight_files(files.path)]
        if missing:
            raise ModelFormatError(f"{files.path}: {self.id} needs the projector weights {', '.join(missing)} in "
                                   f"its safetensors files")
        tokens = _tokenizer_tokens(files)
        absent = [m for m in (DOC_MARKER, QUERY_MARKER) if m not in tokens]
        if absent:
            raise ModelFormatError(f"{files.path}: the tokenizer lacks the marker token(s) {', '.join(absent)}")
        if instruction is not None:
            self.check_instruction(instruction)
        window = files.window()
        lim = limits_for(window)
        if lim.too_small():
            raise ModelFormatError(f"{files.path}: a {window}-token window is too small for listwise blocks")
        options = {"instruction": instruction, "block_size": lim.block_size}
        return ModelSpec(files.path, self.id, files.model_type, ARCHITECTURE, window, options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> ListwiseTextEncoder:
        lim = limits_for(spec.max_length)
        return ListwiseTextEncoder(tokenizer, lim, render, (DOC_MARKER, QUERY_MARKER),
                                   spec.options.get("instruction"))

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        markers = (int(tokenizer.convert_tokens_to_ids(DOC_MARKER)), int(tokenizer.convert_tokens_to_ids(QUERY_MARKER)))
        return Network(spec.path, head=f"{self.id}:markers:{markers[0]}-{markers[1]}",
                       build=lambda b: _build(spec, markers, b), build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> ListwiseScorer:
        return ListwiseScorer(runtime, pad_id)
