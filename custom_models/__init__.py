"""flame's example custom architectures, registered with the transformers Auto classes on import.

``import custom_models`` (or ``--experimental.custom_model_path custom_models`` for training, and
``--custom_model_path custom_models`` for ``convert_dcp_to_hf``) makes ``model_type: "ember"``
configs load through ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from custom_models.ember import EmberConfig, EmberForCausalLM, EmberModel

AutoConfig.register(EmberConfig.model_type, EmberConfig, exist_ok=True)
AutoModel.register(EmberConfig, EmberModel, exist_ok=True)
AutoModelForCausalLM.register(EmberConfig, EmberForCausalLM, exist_ok=True)

__all__ = ["EmberConfig", "EmberForCausalLM", "EmberModel"]
