"""Training settings whose defaults depend on the model."""

from svi_infer.spec import get_spec
from svi_train.config import OptimSettings


def test_gradient_checkpointing_defaults_on_for_real_models_only():
    assert OptimSettings().checkpointing(get_spec("wan2.1-i2v-14b-480p"))
    assert OptimSettings().checkpointing(get_spec("wan2.2-i2v-a14b"))
    assert not OptimSettings().checkpointing(get_spec("tiny-wan2.1-i2v"))
    assert not OptimSettings().checkpointing(get_spec("toy-wan2.1-i2v"))
    assert not OptimSettings(gradient_checkpointing=False).checkpointing(get_spec("wan2.1-i2v-14b-480p"))
    assert OptimSettings(gradient_checkpointing=True).checkpointing(get_spec("tiny-wan2.1-i2v"))
