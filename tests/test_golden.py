"""glm4rt against transformers' outputs recorded in the committed fixtures (runs without torch)."""
import numpy as np
import pytest

import glm4rt
from conftest import fixture_dir, golden
from golden_checks import check_all

CASES = {"gqa1_official": "causal", "gqa2_nobias_tied_v5": "causal",
         "gqa8_bf16_sharded": "causal", "generation": "causal", "seqcls": "seqcls", "seqcls_regression": "seqcls",
         "tokcls": "tokcls"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_transformers(name):
    check_all(fixture_dir(name), CASES[name], golden(name))


@pytest.mark.parametrize("isa", glm4rt.supported_isas())
def test_every_isa_matches_transformers(isa):
    glm4rt.set_isa(isa)
    check_all(fixture_dir("gqa8_bf16_sharded"), "causal", golden("gqa8_bf16_sharded"))
    check_all(fixture_dir("gqa2_nobias_tied_v5"), "causal", golden("gqa2_nobias_tied_v5"))


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_bf16_compute_stays_near_transformers(dtype):
    # Kept as bf16, the matrices multiply bf16-rounded activations (exactly as specified: see
    # test_numpy_reference.py); the logits stay within bf16 rounding of transformers' fp32 run.
    g = golden("gqa8_bf16_sharded")
    model = glm4rt.Glm4ForCausalLM.from_pretrained(fixture_dir("gqa8_bf16_sharded"), dtype=dtype)
    err = np.abs(model(g["ids"]).logits - g["logits"]).max() / np.abs(g["logits"]).max()
    assert 1e-6 < err < 1e-2, err
