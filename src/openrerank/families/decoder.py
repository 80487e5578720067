"""What the LLM (causal decoder) rerankers share: a prompt template and a readout at the last real token.

Each of these families asks a causal LM a yes/no question in a fixed prompt and reads the answer's logits
at the final position: Qwen3-Reranker `logit(yes) - logit(no)`, mxbai-rerank-v2 `logit("1") - logit("0")`,
bge-reranker-v2-gemma `logit("Yes")`. The full-vocabulary logits are never computed: the network gathers
the last *real* token's final hidden state (right padding; the mask says where it is) and multiplies it, in
float32, by just the LM-head rows it needs. A causal LM is served as a reranker only where its files say so
unambiguously (its published name, or a model card declaring text-ranking), or when the operator names the
family (`--model-family`).
"""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import ClassVar

from openrerank.core.requests import ScoreKind
from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.pair_scorer import PairScorer
from openrerank.runtimes.base import Network, NetworkBuild
from openrerank.runtimes.torch_runtime import torch_dtype
from openrerank.sources.safety import weights_kwargs
from openrerank.text.template import PromptTemplate, TemplateTextEncoder


def causal_architecture(files: ModelFiles) -> str | None:
    return next((a for a in files.architectures if a.endswith("ForCausalLM")), None)


def single_token_id(tokenizer, text: str, how: str) -> int:
    """The id of one answer token, resolved the way the family's reference does (`how`)."""
    if how == "token":
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ModelFormatError(f"the tokenizer has no token {text!r}, which this reranker reads")
        return int(tid)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelFormatError(f"the tokenizer encodes {text!r} to nothing")
    return int(ids[0])


def _build_readout(spec: ModelSpec, token_ids: tuple[int, ...], build: NetworkBuild):
    import torch
    from transformers import AutoModelForCausalLM

    from openrerank.families.shared_prefix import last_hidden_states

    model = AutoModelForCausalLM.from_pretrained(str(spec.path), dtype=torch_dtype(build.dtype),
                                                 local_files_only=True, **weights_kwargs(spec.path))
    head = model.get_output_embeddings().weight
    rows = head[list(token_ids)].detach().float().clone()  # (k, hidden): the only LM-head rows ever used
    softcap = getattr(model.config, "final_logit_softcapping", None)
    body = model.model

    class LastTokenReadout(torch.nn.Module):
        """(input_ids, attention_mask) -> answer logit(s) at the last real token, float32 `(batch,)`:
        the first row's logit minus the second's, or the single row's logit."""

        input_names = ("input_ids", "attention_mask")

        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.register_buffer("rows", rows)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden, offset = last_hidden_states(self.body, input_ids, attention_mask)  # shared prefix once
            last = attention_mask.sum(dim=1) - 1 - offset
            h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                logits = h_last.float() @ self.rows.T
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
            return logits[:, 0] - logits[:, 1] if logits.shape[1] == 2 else logits[:, 0]

    return LastTokenReadout()


class DecoderRerankerFamily(Family):
    """A causal LM asked a yes/no question; subclasses give the prompt and the answer tokens."""

    score_kind = ScoreKind.LOGIT
    runtimes = ("torch",)
    #: `*ForCausalLM` architectures this family is published with (auto-detection needs one of them).
    architectures: ClassVar[tuple[str, ...]]
    #: Published repository names (matched in the hub id or directory name) that make detection unambiguous.
    name_pattern: ClassVar[re.Pattern[str]]
    #: (true text, false text or None), and how the reference resolves them: "token" (vocabulary lookup) or
    #: "encode" (first id of the encoded text).
    answer: ClassVar[tuple[str, str | None]]
    answer_lookup: ClassVar[str] = "encode"
    default_instruction: ClassVar[str | None] = None

    @abstractmethod
    def template(self, instruction: str | None) -> PromptTemplate: ...

    def matches(self, files: ModelFiles) -> bool:
        if not any(a in self.architectures for a in files.architectures):
            return False
        return bool(self.name_pattern.search(files.name) or self.name_pattern.search(str(files.path))
                    or files.says_reranker())

    def spec(self, files: ModelFiles, instruction: str | None = None) -> ModelSpec:
        arch = causal_architecture(files)
        if arch is None:
            raise ModelFormatError(f"{files.path}: {self.id} needs a causal LM checkpoint (*ForCausalLM), found "
                                   f"{files.architectures or 'no architectures'}")
        if instruction is not None:
            self.check_instruction(instruction)
        options = {"instruction": instruction if instruction is not None else self.default_instruction}
        return ModelSpec(files.path, self.id, files.model_type, arch, files.window(), options)

    def text_encoder(self, spec: ModelSpec, tokenizer) -> TemplateTextEncoder:
        return TemplateTextEncoder(tokenizer, spec.max_length, self.template(spec.options.get("instruction")),
                                   template_for=self.template if self.takes_instruction else None)

    def answer_ids(self, tokenizer) -> tuple[int, ...]:
        true, false = self.answer
        ids = [single_token_id(tokenizer, true, self.answer_lookup)]
        if false is not None:
            ids.append(single_token_id(tokenizer, false, self.answer_lookup))
        return tuple(ids)

    def network(self, spec: ModelSpec, tokenizer) -> Network:
        ids = self.answer_ids(tokenizer)
        return Network(spec.path, head=f"{self.id}:last-token:{'-'.join(map(str, ids))}",
                       build=lambda b: _build_readout(spec, ids, b), build_format=self.build_format)

    def scorer(self, spec, runtime, pad_id) -> PairScorer:
        return PairScorer(runtime, pad_id)
