"""Which local model a served entity's ``entity_name`` means.

* ``system.ai.<model>`` — a bundled model (the weights packages, DESIGN.md).
* a path to a ``.gguf`` file — chat/completions on llama.cpp.
* a path to a sentence-transformers folder (``modules.json``) — embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fmserve.engines import bundled
from fmserve.engines.weights import ENV_VAR as WEIGHTS_VAR
from fmserve.engines.weights import check_weights
from fmserve.errors import InvalidParameterValue
from fmserve.protocol.endpoints import FoundationModel

TASK_CHAT = "llm/v1/chat"
TASK_COMPLETIONS = "llm/v1/completions"
TASK_EMBEDDINGS = "llm/v1/embeddings"


@dataclass(frozen=True)
class ModelSource:
    engine: str  # "llama_cpp" | "sentence_transformers"
    path: str
    task: str
    foundation_model: FoundationModel | None = None
    throughput_chunk_size: int | None = None  # tokens/s one worker replica sustains
    weights: str = "gguf"  # llama.cpp weights to load by default (engines/weights.py)


# Provisioned-throughput step sizes (tokens/s per worker replica), rounded down from
# what one replica measured on the reference machine (2-core x86-64, see
# bench/bench_core.py): SmolLM2-135M decodes 70-140 tokens/s single-stream;
# all-MiniLM-L6-v2 embeds ~380 texts/s of ~10 tokens.
SMOLLM2_CHUNK = 50
MINILM_CHUNK = 2000

# workload_size → (min replicas, max replicas). Each llama.cpp replica decodes up to
# FMSERVE_LLAMA_MAX_SEQS requests together and queues FMSERVE_MAX_QUEUE more; the
# pool adds a replica when every replica has 2+ outstanding.
WORKLOAD_SIZES = {"Small": (1, 1), "Medium": (1, 2), "Large": (1, 4)}

SYSTEM_MODELS = {
    "smollm2-135m-instruct": lambda: ModelSource(
        "llama_cpp", str(bundled.smollm2_gguf()), TASK_CHAT,
        FoundationModel(name="smollm2-135m-instruct", display_name="SmolLM2 135M Instruct",
                        description="Hugging Face SmolLM2-135M-Instruct on llama.cpp: the "
                                    "shipped 4-bit (Q4_1) GGUF, served as a BF16 (AVX512-BF16 "
                                    "CPUs) or Q8_0 copy, which batches concurrent requests "
                                    "far better.",
                        docs="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
        SMOLLM2_CHUNK, weights="auto"),
    "all-minilm-l6-v2": lambda: ModelSource(
        "sentence_transformers", str(bundled.minilm_folder()), TASK_EMBEDDINGS,
        FoundationModel(name="all-minilm-l6-v2", display_name="all-MiniLM-L6-v2",
                        description="sentence-transformers/all-MiniLM-L6-v2, 384-dim embeddings.",
                        docs="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"),
        MINILM_CHUNK),
}


def resolve(entity_name: str | None) -> ModelSource:
    """The model behind ``entity_name``.

    Raises:
        InvalidParameterValue: 400 for an unknown system model or a missing path.
    """
    if not entity_name:
        raise InvalidParameterValue("A served entity needs 'entity_name' (e.g. "
                                    "'system.ai.smollm2-135m-instruct' or a .gguf path).")
    if entity_name.startswith("system.ai."):
        key = entity_name.removeprefix("system.ai.")
        if key not in SYSTEM_MODELS:
            raise InvalidParameterValue(
                f"Served entity {entity_name} does not exist. Known system models: "
                + ", ".join(f"system.ai.{k}" for k in sorted(SYSTEM_MODELS)) + ".")
        return SYSTEM_MODELS[key]()
    path = Path(entity_name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InvalidParameterValue(f"Model file {entity_name} does not exist.")
        return ModelSource("llama_cpp", str(path.resolve()), TASK_CHAT)
    if path.is_dir() and (path / "modules.json").is_file():
        return ModelSource("sentence_transformers", str(path.resolve()), TASK_EMBEDDINGS)
    raise InvalidParameterValue(
        f"Unknown entity_name '{entity_name}': use system.ai.<model>, a path to a .gguf file "
        "(chat/completions) or to a sentence-transformers folder (embeddings).")


def llama_weights(environment_vars: dict[str, str] | None, server_default: str,
                  source: ModelSource) -> str:
    """The weights a llama.cpp entity loads (``engines/weights.py``): the entity's
    ``environment_vars.FMSERVE_LLAMA_WEIGHTS``, else the server's, else the model's.

    Raises:
        InvalidParameterValue: 400 for a value that names no weights type.
    """
    value = (environment_vars or {}).get(WEIGHTS_VAR) or server_default or source.weights
    try:
        return check_weights(value)
    except ValueError as e:
        raise InvalidParameterValue(str(e)) from None


def replicas_for(inp_min_pt: int | None, inp_max_pt: int | None, workload_size: str | None,
                 source: ModelSource, entity: str) -> tuple[int, int]:
    """``(min, max)`` worker replicas for a served entity.

    Provisioned throughput (tokens/s) must be a multiple of the model's
    ``throughput_chunk_size``; one chunk = one replica.

    Raises:
        InvalidParameterValue: 400 for ineligible models, non-multiples, min > max,
            an unknown ``workload_size``.
    """
    if inp_min_pt is not None or inp_max_pt is not None:
        chunk = source.throughput_chunk_size
        if not chunk:
            raise InvalidParameterValue(
                f"Served entity {entity} is not eligible for Provisioned Throughput.")
        lo, hi = inp_min_pt or 0, inp_max_pt if inp_max_pt is not None else inp_min_pt or 0
        for label, v in (("min_provisioned_throughput", lo), ("max_provisioned_throughput", hi)):
            if v % chunk:
                raise InvalidParameterValue(
                    f"{label} ({v} tokens/s) must be a multiple of {chunk} tokens/s for "
                    f"{entity}; see GET /api/2.0/serving-endpoints/get-model-optimization-info.")
        if hi < lo or hi == 0:
            raise InvalidParameterValue(
                f"max_provisioned_throughput ({hi}) must be at least min_provisioned_throughput "
                f"({lo}) and above 0.")
        return lo // chunk, hi // chunk
    if workload_size is None:
        return 1, 1
    if workload_size not in WORKLOAD_SIZES:
        raise InvalidParameterValue(
            f"workload_size '{workload_size}' is not one of {', '.join(WORKLOAD_SIZES)}.")
    return WORKLOAD_SIZES[workload_size]


def optimization_info(entity_name: str) -> dict[str, object]:
    """``{"optimizable", "model_type", "throughput_chunk_size"}`` for ``entity_name``.

    Raises:
        InvalidParameterValue: 400 for an unknown model.
    """
    source = resolve(entity_name)
    chunk = source.throughput_chunk_size
    info: dict[str, object] = {"optimizable": bool(chunk),
                               "model_type": "embedding" if source.task == TASK_EMBEDDINGS
                               else "llm"}
    if chunk:
        info["throughput_chunk_size"] = chunk
    return info
