"""The registry of model families: the one place that lists them, detects them, and looks them up by id."""

from __future__ import annotations

from openrerank.families.base import Family, ModelFiles, ModelFormatError, ModelSpec
from openrerank.families.bge_reranker_gemma import BgeRerankerGemmaFamily
from openrerank.families.bi_encoder import BiEncoderFamily
from openrerank.families.colbert import ColbertFamily
from openrerank.families.cross_encoder import CrossEncoderFamily, classifier_architecture
from openrerank.families.decoder import causal_architecture
from openrerank.families.jina_reranker_m0 import JinaRerankerM0Family
from openrerank.families.jina_reranker_v3 import JinaRerankerV3Family
from openrerank.families.llama_bidirectional import LlamaBidirectionalFamily
from openrerank.families.mxbai_rerank_v2 import MxbaiRerankV2Family
from openrerank.families.nemotron_vl import NemotronVLFamily
from openrerank.families.qwen3_reranker import Qwen3RerankerFamily

#: In detection order: the specific before the general (a Llama-bidirectional config also names a
#: *ForSequenceClassification, which the cross-encoder family would claim, and so does the VL reranker's, and
#: vLLM's name for jina-reranker-m0; a PyLate ColBERT folder also has the modules.json the bi-encoder family
#: would claim). jina-reranker-m0 is claimed by its architecture alone, which no family above it names.
FAMILIES: tuple[Family, ...] = (
    NemotronVLFamily(),
    JinaRerankerV3Family(),
    LlamaBidirectionalFamily(),
    Qwen3RerankerFamily(),
    JinaRerankerM0Family(),
    MxbaiRerankV2Family(),
    BgeRerankerGemmaFamily(),
    CrossEncoderFamily(),
    ColbertFamily(),
    BiEncoderFamily(),
)
_BY_ID = {f.id: f for f in FAMILIES}


def get_family(family_id: str) -> Family:
    try:
        return _BY_ID[family_id]
    except KeyError:
        raise ModelFormatError(f"unknown model family {family_id!r}; families: {', '.join(_BY_ID)}") from None


def detect_family(files: ModelFiles) -> Family:
    """The family the files name unambiguously; a clear error (naming --model-family) otherwise."""
    for family in FAMILIES:
        if family.matches(files):
            return family
    causal = causal_architecture(files)
    if causal:
        decoders = ", ".join(f.id for f in FAMILIES if f.runtimes == ("torch",) and not f.listwise
                             and f.id not in ("llama-bidirectional", "colbert", "nemotron-vl", "jina-reranker-m0"))
        raise ModelFormatError(
            f"{files.path}: {causal} is a causal language model; openrerank serves one as a reranker only when "
            f"its name or model card says which reranker it is. If it is one, name its family with "
            f"--model-family NAME=FAMILY ({decoders})")
    classifier = classifier_architecture(files)
    if classifier:  # a decoder with a classification head (cross-encoder detection leaves these alone)
        raise ModelFormatError(
            f"{files.path}: {classifier} is a {files.model_type} decoder with a classification head, which reads "
            f"text through a prompt template; openrerank serves LLM rerankers from their original causal-LM "
            f"checkpoints (e.g. Qwen/Qwen3-Reranker-0.6B rather than a -seq-cls conversion) or NVIDIA's "
            f"Llama-bidirectional config: `openrerank families` lists them")
    raise ModelFormatError(
        f"{files.path}: neither a sequence-classification cross-encoder (config.json architectures "
        f"*ForSequenceClassification, found {files.architectures or 'none'}) nor a sentence-transformers bi-encoder "
        f"(modules.json with a Pooling module); --model-family names the family of a model that is neither "
        f"({', '.join(_BY_ID)})")


def resolve_spec(files: ModelFiles, family_id: str | None = None, instruction: str | None = None
                 ) -> tuple[Family, ModelSpec]:
    """The model's family (detected, or the one named) and its spec."""
    family = get_family(family_id) if family_id else detect_family(files)
    if instruction is not None:
        try:
            family.check_instruction(instruction)
        except ModelFormatError as exc:
            takers = ", ".join(f.id for f in FAMILIES if f.takes_instruction)
            raise ModelFormatError(f"{files.path}: {exc} (families that take one: {takers})") from None
    return family, family.spec(files, instruction)
