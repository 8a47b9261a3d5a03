"""Which local model a served entity's ``entity_name`` means.

* ``system.ai.<model>`` — a bundled model (the weights packages, DESIGN.md).
* a path to a ``.gguf`` file — chat/completions on llama.cpp.
* a path to a sentence-transformers folder (``modules.json``) — embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fmserve.engines import bundled
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


SYSTEM_MODELS = {
    "smollm2-135m-instruct": lambda: ModelSource(
        "llama_cpp", str(bundled.smollm2_gguf()), TASK_CHAT,
        FoundationModel(name="smollm2-135m-instruct", display_name="SmolLM2 135M Instruct",
                        description="Hugging Face SmolLM2-135M-Instruct, 4-bit (Q4_1) GGUF on "
                                    "llama.cpp.",
                        docs="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct")),
    "all-minilm-l6-v2": lambda: ModelSource(
        "sentence_transformers", str(bundled.minilm_folder()), TASK_EMBEDDINGS,
        FoundationModel(name="all-minilm-l6-v2", display_name="all-MiniLM-L6-v2",
                        description="sentence-transformers/all-MiniLM-L6-v2, 384-dim embeddings.",
                        docs="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2")),
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
