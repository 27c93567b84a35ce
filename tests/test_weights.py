"""The canonical safetensors format: exact round trips, refusal of files that do not fit."""

import numpy as np
import pytest

from parity import weights as W
from parity.config import preset


@pytest.fixture
def config():
    return preset("tiny", pool="cls", posemb="learned")


def test_file_round_trip_is_bitwise_and_carries_the_config(tmp_path, config):
    tensors = W.random_canonical(config, 5)
    path = tmp_path / "m.safetensors"
    W.save(path, tensors, config)
    loaded, stored = W.load(path)
    assert stored == config
    assert set(loaded) == set(tensors)
    for n in tensors:
        assert loaded[n].tobytes() == tensors[n].tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name != "m.safetensors"]  # no temp left


def test_the_same_weights_always_give_the_same_file(tmp_path, config):
    # safetensors alone writes its metadata in a random order on each save, so a checksum
    # could not tell two runs' identical weights apart from different ones
    tensors = W.random_canonical(config, 5)
    files = set()
    for i in range(12):
        W.save(tmp_path / f"{i}.safetensors", tensors, config, metadata={"b": "2", "a": "1"})
        files.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(files) == 1
    loaded, stored = W.load(tmp_path / "0.safetensors", config)
    assert stored == config and all(loaded[n].tobytes() == tensors[n].tobytes() for n in tensors)


def test_names_and_shapes_that_do_not_fit_are_named(tmp_path, config):
    tensors = W.random_canonical(config, 5)
    bad = dict(tensors)
    del bad["head.bias"]
    bad["blocks.0.mlp.fc1.kernel"] = np.zeros((3, 3), np.float32)
    bad["extra.thing"] = np.zeros(2, np.float32)
    with pytest.raises(W.WeightsError) as err:
        W.check(bad, config)
    msg = str(err.value)
    assert "missing head.bias" in msg and "unexpected extra.thing" in msg
    assert "blocks.0.mlp.fc1.kernel has shape (3, 3)" in msg


def test_a_file_from_another_architecture_is_refused(tmp_path, config):
    path = tmp_path / "other.safetensors"
    other = preset("tiny", width=48, num_heads=2)
    W.save(path, W.random_canonical(other, 0), other)
    with pytest.raises(W.WeightsError, match="do not fit the config"):
        W.load(path, config)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "garbage"])
def test_damaged_files_are_refused_cleanly(tmp_path, config, damage):
    path = tmp_path / "m.safetensors"
    W.save(path, W.random_canonical(config, 0), config)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 100])
    elif damage == "header":
        path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x80\x04K\x01.")  # a pickle, which we must never run
    with pytest.raises(W.WeightsError):
        W.load(path, config)


def test_torch_state_dict_round_trip_is_bitwise(config):
    import torch

    from torchvit.model import ViT

    state = ViT(config).state_dict()
    back = W.canonical_to_torch(W.torch_to_canonical(state), config)
    assert set(back) == set(state)
    assert all(torch.equal(back[n], state[n]) for n in state)


@pytest.mark.parametrize("options", [{}, {"spt": True, "lsa": True}], ids=["plain", "spt-lsa"])
def test_both_optimizers_decay_the_same_tensors_the_kernels_only(options):
    """One rule (`W.decays`) picks the tensors that take weight decay, in both trainers."""
    import jax

    from torchvit.model import ViT

    config = preset("tiny", pool="cls", posemb="learned", **options)
    table = W.random_canonical(config)
    mask = W.flax_to_canonical(W.flax_decay_mask(W.canonical_to_flax(table, config)))
    flax_decayed = {n for n, m in mask.items() if m}
    model = ViT(config)
    decayed, rest = W.torch_param_groups(model, 0.05)
    by_id = {id(p): W.torch_name_to_canonical(n, p.ndim) for n, p in model.named_parameters()}
    torch_decayed = {by_id[id(p)] for p in decayed["params"]}
    assert (decayed["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    assert flax_decayed == torch_decayed == {n for n in table if n.endswith(".kernel")}
    assert len(decayed["params"]) + len(rest["params"]) == len(table)
    assert any(n.startswith("blocks.0.") for n in flax_decayed)  # the blocks' kernels too
    # the mask reads only the tree's keys, so optax can call it on traced params inside jit
    traced = jax.jit(lambda p: W.flax_decay_mask(p))(W.canonical_to_flax(table, config))
    assert W.flax_to_canonical(traced) == mask
