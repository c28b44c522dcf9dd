"""Launch configs parse as accelerate configs; the FSDP wrap class is found generically."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from scalebio_core.config import CONFIG_DIR
from scalebio_core.errors import ConfigError
from scalebio_core.scaleout import KINDS, accelerate_config, block_class


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_configs_parse_with_accelerate(kind):
    cfg = load_config_from_file(str(CONFIG_DIR / "accelerate" / f"{kind}.yaml"))
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"


@pytest.mark.parametrize(
    "arch, cls",
    [("llama", "LlamaDecoderLayer"), ("gpt_neox", "GPTNeoXLayer"), ("gpt2", "GPT2Block")],
)
def test_fsdp_wrap_class_resolved_on_tiny_models(arch, cls, tmp_path):
    from scalebio_core.models import save_tiny_model

    path = save_tiny_model(arch, tmp_path / arch)
    assert block_class(str(path)) == cls
    cfg = accelerate_config("fsdp", str(path), gpus=2, offload=True)
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == cls
    assert cfg["fsdp_config"]["fsdp_version"] == 2  # per-parameter sharding: LISA can freeze
    out = tmp_path / "fsdp.yaml"
    import yaml

    out.write_text(yaml.safe_dump(cfg))
    assert load_config_from_file(str(out)).fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == cls


def test_paper_models_wrap_classes_offline():
    assert block_class("01-ai/Yi-34B") == "LlamaDecoderLayer"
    assert block_class("EleutherAI/gpt-neox-20b") == "GPTNeoXLayer"
    with pytest.raises(ConfigError, match="unknown launch kind"):
        accelerate_config("zero9")
