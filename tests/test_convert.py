"""``meanflow convert``: the authors' checkpoints, built here with the exact names, shapes and file
format their code writes (Gsunshine/meanflow models/models_dit.py, models/torch_models.py,
models/timm_models.py, flax msgpack; Gsunshine/py-meanflow meanflow/models/unet.py), converted
and compared with a numpy transcription of their forward pass."""

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from cli_helpers import run

from meanflow import MeanFlowError
from meanflow.nn.convert import dit_state_dict, flatten_tree
from meanflow.runs.authors import read_flax_msgpack
from meanflow.runs.noise import sample_noise

DEPTH, HIDDEN, PATCH, CH, SIZE, CLASSES = 2, 64, 2, 4, 8, 5


# --- a msgpack writer of flax's encoding (serialization.msgpack_serialize) -------------------

def _pack(x) -> bytes:
    if isinstance(x, dict):
        n = len(x)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
        return head + b"".join(_pack(k) + _pack(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return bytes([0x90 | len(x)]) + b"".join(_pack(v) for v in x)
    if isinstance(x, str):
        raw = x.encode()
        return (bytes([0xA0 | len(raw)]) if len(raw) < 32 else b"\xd9" + bytes([len(raw)])) + raw
    if isinstance(x, bytes):
        return b"\xc6" + struct.pack(">I", len(x)) + x
    if isinstance(x, (bool, np.bool_)):
        return b"\xc3" if x else b"\xc2"
    if isinstance(x, int):
        return bytes([x]) if 0 <= x < 128 else b"\xd3" + struct.pack(">q", x)
    if isinstance(x, float):
        return b"\xcb" + struct.pack(">d", x)
    if isinstance(x, np.ndarray):  # ext type 1: packb((shape, dtype name, C bytes))
        payload = _pack((list(x.shape), x.dtype.name, x.tobytes("C")))
        return b"\xc9" + struct.pack(">I", len(payload)) + b"\x01" + payload
    raise TypeError(type(x))


def _authors_params(seed=0, classes=CLASSES, depth=DEPTH):
    """params['net'] of their DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64,
    depth=2, num_heads=4, num_classes=5): flax names, Dense kernels (in, out), Conv HWIO."""
    g = np.random.default_rng(seed)

    def dense(i, o):
        return {"_flax_linear": {"kernel": g.normal(0, 0.3, (i, o)).astype(np.float32),
                                 "bias": g.normal(0, 0.3, (o,)).astype(np.float32)}}

    def embedder():
        return {"mlp": {"layers_0": dense(256, HIDDEN), "layers_2": dense(HIDDEN, HIDDEN)}}

    blocks = {f"layers_{i}": {"attn": {"qkv": dense(HIDDEN, 3 * HIDDEN),
                                       "proj": dense(HIDDEN, HIDDEN)},
                              "mlp": {"fc1": dense(HIDDEN, 4 * HIDDEN),
                                      "fc2": dense(4 * HIDDEN, HIDDEN)},
                              "adaLN_modulation": {"layers_1": dense(HIDDEN, 6 * HIDDEN)}}
              for i in range(depth)}
    return {
        "x_embedder": {"proj": {"kernel": g.normal(0, 0.3, (PATCH, PATCH, CH, HIDDEN))
                                .astype(np.float32),
                                "bias": g.normal(0, 0.3, (HIDDEN,)).astype(np.float32)}},
        "t_embedder": embedder(), "h_embedder": embedder(),
        "y_embedder": {"embedding_table": {"_flax_embedding": {
            "embedding": g.normal(0, 0.3, (classes + 1, HIDDEN)).astype(np.float32)}}},
        "blocks": blocks,
        "final_layer": {"adaLN_modulation": {"layers_1": dense(HIDDEN, 2 * HIDDEN)},
                        "linear": dense(HIDDEN, PATCH * PATCH * CH)},
    }


# --- their forward pass, transcribed in numpy (NHWC, float64) -------------------------------

def _reference(net, x, t, h, y, heads=4):
    f = {k: v.astype(np.float64) for k, v in flatten_tree(net).items()}

    def lin(name, v):
        return v @ f[name + "/_flax_linear/kernel"] + f[name + "/_flax_linear/bias"]

    def layer_norm(v):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

    def silu(v):
        return v / (1 + np.exp(-v))

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    def temb(name, s):
        freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
        args = s[:, None] * freqs[None]
        e = np.concatenate([np.cos(args), np.sin(args)], -1)
        return lin(f"{name}/mlp/layers_2", silu(lin(f"{name}/mlp/layers_0", e)))

    def sincos_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    b, g = x.shape[0], SIZE // PATCH
    grid = np.stack(np.meshgrid(np.arange(g, dtype=float), np.arange(g, dtype=float)), 0)
    pos = np.concatenate([sincos_1d(HIDDEN // 2, grid[0]), sincos_1d(HIDDEN // 2, grid[1])], 1)
    # conv with kernel (p, p, C, D), stride p, NHWC -> tokens row-major over (h, w)
    patches = x.reshape(b, g, PATCH, g, PATCH, CH).transpose(0, 1, 3, 2, 4, 5)
    tok = np.einsum("nhwpqc,pqcd->nhwd", patches, f["x_embedder/proj/kernel"])
    tok = tok.reshape(b, g * g, HIDDEN) + f["x_embedder/proj/bias"] + pos
    c = temb("t_embedder", t) + temb("h_embedder", h) + \
        f["y_embedder/embedding_table/_flax_embedding/embedding"][y]
    for i in range(DEPTH):
        pre = f"blocks/layers_{i}"
        mod = np.split(lin(f"{pre}/adaLN_modulation/layers_1", silu(c)), 6, axis=1)
        sh1, sc1, g1, sh2, sc2, g2 = [m[:, None] for m in mod]
        a = layer_norm(tok) * (1 + sc1) + sh1
        qkv = lin(f"{pre}/attn/qkv", a).reshape(b, g * g, 3, heads, HIDDEN // heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        w = q @ k.transpose(0, 1, 3, 2) * (HIDDEN // heads) ** -0.5
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = (w @ v).transpose(0, 2, 1, 3).reshape(b, g * g, HIDDEN)
        tok = tok + g1 * lin(f"{pre}/attn/proj", a)
        m = layer_norm(tok) * (1 + sc2) + sh2
        tok = tok + g2 * lin(f"{pre}/mlp/fc2", gelu(lin(f"{pre}/mlp/fc1", m)))
    shift, scale = np.split(lin("final_layer/adaLN_modulation/layers_1", silu(c)), 2, axis=1)
    out = lin("final_layer/linear", layer_norm(tok) * (1 + scale[:, None]) + shift[:, None])
    out = out.reshape(b, g, g, PATCH, PATCH, CH)
    return np.einsum("nhwpqc->nhpwqc", out).reshape(b, SIZE, SIZE, CH)


def _write_orbax(workdir, step, ema, raw):
    """A flax/orbax checkpoint_<step>/checkpoint file of their TrainState (aggregated arrays)."""
    folder = os.path.join(workdir, f"checkpoint_{step}")
    os.makedirs(folder)
    state = {"step": step, "params": {"net": raw}, "ema_params": {"net": ema},
             "opt_state": {"0": {"count": np.array(step, dtype=np.int32)}}}
    with open(os.path.join(folder, "checkpoint"), "wb") as f:
        f.write(_pack(state))
    return folder


def _convert(capsys, *argv):
    return run(capsys, "convert", *argv, "--threads", "1")


def test_msgpack_reader_reads_flax_encoding(tmp_path):
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "step": 300,
            "n": -5, "x": 1.5, "s": "text", "ok": True}
    path = tmp_path / "t.msgpack"
    path.write_bytes(_pack(tree))
    back = read_flax_msgpack(str(path))
    assert np.array_equal(back["a"]["b"], tree["a"]["b"]) and back["a"]["b"].dtype == np.float32
    assert {k: back[k] for k in ("step", "n", "x", "s", "ok")} == \
        {"step": 300, "n": -5, "x": 1.5, "s": "text", "ok": True}


def test_every_tensor_lands_in_place_with_its_transpose():
    net = _authors_params()
    sd = dit_state_dict(net)
    lin = net["blocks"]["layers_1"]["attn"]["qkv"]["_flax_linear"]
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], torch.from_numpy(lin["kernel"].T.copy()))
    kernel = net["x_embedder"]["proj"]["kernel"]                      # (p, p, C, D)
    assert torch.equal(sd["patchify.weight"][5, 2, 1, 0], torch.tensor(kernel[1, 0, 2, 5]))
    assert torch.equal(sd["cond.label.weight"], torch.from_numpy(
        net["y_embedder"]["embedding_table"]["_flax_embedding"]["embedding"]))
    # one converted tensor per parameter of theirs, every value used exactly once
    assert len(sd) == len(flatten_tree(net))
    assert sum(v.numel() for v in sd.values()) == sum(v.size for v in flatten_tree(net).values())


def test_converted_run_matches_their_forward_and_samples(tmp_path, capsys):
    ema, raw = _authors_params(0), _authors_params(1)
    _write_orbax(tmp_path / "work", 100, _authors_params(2), _authors_params(3))
    _write_orbax(tmp_path / "work", 200, ema, raw)      # the newest is converted
    out = str(tmp_path / "run")
    code, stdout, err = _convert(capsys, "--from", "authors-jax", "--checkpoint",
                                 str(tmp_path / "work"), "--out", out, "--image-size", "8")
    assert code == 0, err
    assert '"size": "T/2"' in stdout and '"step": 200' in stdout

    from meanflow.train import load_run
    for weights, params in (("ema", ema), ("raw", raw)):
        trained = load_run(out, weights)
        assert trained.num_classes == CLASSES and trained.shape == (CH, SIZE, SIZE)
        g = np.random.default_rng(5)
        x = g.normal(size=(3, SIZE, SIZE, CH))
        t, r, y = np.array([0.9, 0.5, 0.3]), np.array([0.2, 0.5, 0.0]), np.array([0, 4, 5])
        want = _reference(params, x, t, t - r, y)
        with torch.no_grad():
            got = trained.model.double()(torch.from_numpy(x).permute(0, 3, 1, 2),
                                         torch.from_numpy(r), torch.from_numpy(t),
                                         torch.from_numpy(y))
        assert np.allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-9)

    code, _, err = run(capsys, "sample", "--run", out, "--num", "4", "--out",
                       str(tmp_path / "s.npy"), "--threads", "1")
    assert code == 0, err
    samples = np.load(tmp_path / "s.npy")
    z = sample_noise((CH, SIZE, SIZE), 0, 0, 4).double().permute(0, 2, 3, 1).numpy()
    ones = np.ones(4)
    one_step = z - _reference(ema, z, ones, ones, np.arange(4) % CLASSES)  # x = z - u(z, 0, 1)
    diff = np.abs(samples - one_step.transpose(0, 3, 1, 2))
    assert diff.max() < 1e-4 * np.abs(one_step).max(), diff.max()  # float32 vs float64


@pytest.mark.parametrize("case", ["unknown", "missing"])
def test_unknown_and_missing_names_are_refused_in_one_line(tmp_path, capsys, case):
    net = _authors_params()
    if case == "unknown":
        net["blocks"]["layers_0"]["attn"]["q_norm"] = {"scale": np.ones(16, np.float32)}
    else:
        del net["blocks"]["layers_1"]["mlp"]["fc2"]
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(_pack({"params": {"net": net}, "ema_params": {"net": net}}))
    code, _, err = _convert(capsys, "--from", "authors-jax", "--checkpoint", str(path),
                            "--out", str(tmp_path / "o.safetensors"), "--image-size", "8")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("blocks/layers_0/attn/q_norm/scale" in err if case == "unknown"
            else "missing: blocks.1.mlp.2.bias, blocks.1.mlp.2.weight" in err), err
    assert not (tmp_path / "o.safetensors").exists()


def test_plain_state_dict_output_and_tensorstore_refusal(tmp_path, capsys):
    from safetensors.torch import load_file

    net = _authors_params()
    path = tmp_path / "ckpt.msgpack"
    path.write_bytes(_pack({"params": {"net": net}, "ema_params": {"net": net}}))
    code, _, err = _convert(capsys, "--from", "authors-jax", "--checkpoint", str(path),
                            "--out", str(tmp_path / "dit.safetensors"), "--image-size", "8")
    assert code == 0, err
    sd = load_file(tmp_path / "dit.safetensors")
    assert set(sd) == set(dit_state_dict(net))
    ocdbt = tmp_path / "checkpoint_5"
    ocdbt.mkdir()
    (ocdbt / "manifest.ocdbt").write_bytes(b"")
    code, _, err = _convert(capsys, "--from", "authors-jax", "--checkpoint", str(ocdbt),
                            "--out", str(tmp_path / "x"))
    assert code == 2 and "tensorstore" in err
    with pytest.raises(MeanFlowError, match="unknown parameter names"):
        dit_state_dict({**net, "pos_embed": np.zeros((16, HIDDEN), np.float32)})


def _py_meanflow_shapes():
    """Names and shapes of py-meanflow's SongUNet state dict (meanflow/models/unet.py with
    model_configs.py: img_resolution 32, channel_mult [2, 2, 2], channel_mult_noise 2,
    resample_filter [1, 3, 3, 1], model_channels 128, num_blocks 4, attn_resolutions [16],
    augment_dim 6 from --use_edm_aug), transcribed from EDM's constructor."""
    shapes = {"map_augment.weight": (512, 6), "map_layer0.weight": (512, 512),
              "map_layer0.bias": (512,), "map_layer1.weight": (512, 512),
              "map_layer1.bias": (512,)}

    def block(name, cin, cout, up=False, down=False, attention=False):
        p = f"{name}."
        shapes.update({p + "norm0.weight": (cin,), p + "norm0.bias": (cin,),
                       p + "conv0.weight": (cout, cin, 3, 3), p + "conv0.bias": (cout,),
                       p + "affine.weight": (cout, 512), p + "affine.bias": (cout,),
                       p + "norm1.weight": (cout,), p + "norm1.bias": (cout,),
                       p + "conv1.weight": (cout, cout, 3, 3), p + "conv1.bias": (cout,)})
        if up or down:
            shapes[p + "conv0.resample_filter"] = (1, 1, 4, 4)
        if cout != cin or up or down:
            shapes.update({p + "skip.weight": (cout, cin, 1, 1), p + "skip.bias": (cout,)})
            if up or down:
                shapes[p + "skip.resample_filter"] = (1, 1, 4, 4)
        if attention:
            shapes.update({p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
                           p + "qkv.weight": (3 * cout, cout, 1, 1), p + "qkv.bias": (3 * cout,),
                           p + "proj.weight": (cout, cout, 1, 1), p + "proj.bias": (cout,)})
        return cout

    skips, cout = [], 3
    for level, mult in enumerate([2, 2, 2]):
        res = 32 >> level
        if level == 0:
            shapes.update({"enc.32x32_conv.weight": (128, cout, 3, 3), "enc.32x32_conv.bias":
                           (128,)})
            cout = 128
        else:
            cout = block(f"enc.{res}x{res}_down", cout, cout, down=True)
        skips.append(cout)
        for i in range(4):
            cout = block(f"enc.{res}x{res}_block{i}", cout, 128 * mult, attention=res == 16)
            skips.append(cout)
    for level in reversed(range(3)):
        res = 32 >> level
        if level == 2:
            block(f"dec.{res}x{res}_in0", cout, cout, attention=True)
            block(f"dec.{res}x{res}_in1", cout, cout)
        else:
            block(f"dec.{res}x{res}_up", cout, cout, up=True)
        for i in range(5):
            cout = block(f"dec.{res}x{res}_block{i}", cout + skips.pop(), 256,
                         attention=i == 4 and res == 16)
    shapes.update({"dec.32x32_aux_norm.weight": (256,), "dec.32x32_aux_norm.bias": (256,),
                   "dec.32x32_aux_conv.weight": (3, 256, 3, 3), "dec.32x32_aux_conv.bias": (3,)})
    return shapes


def test_py_meanflow_checkpoint_converts_and_samples(tmp_path, capsys):
    import argparse

    pytest.importorskip("meanflow.nn.songunet")
    shapes = _py_meanflow_shapes()
    assert sum(math.prod(s) for k, s in shapes.items() if "resample" not in k) == 55_932_419
    gen = torch.Generator().manual_seed(0)
    fir = torch.tensor([1.0, 3, 3, 1])
    fir = (torch.outer(fir, fir) / fir.sum() ** 2)[None, None]
    nets = {}
    for prefix in ("net", "net_ema1"):
        nets[prefix] = {k: fir.clone() if k.endswith("resample_filter")
                        else 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    state = {f"{p}.{k}": v for p, sd in nets.items() for k, v in sd.items()}
    # the end of cifar10_v1.sh: 16,000 epochs of 48 steps (8 GPUs x 128), counted by the
    # num_updates buffer that update_ema raises once per optimizer step
    state["num_updates"] = torch.tensor(768_000)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "epoch": 15999, "args": argparse.Namespace(arch="unet",
                dropout=0.2, use_edm_aug=True, ema_decays=[0.99995, 0.9996])}, path)
    out = str(tmp_path / "cifar")
    code, stdout, err = _convert(capsys, "--from", "authors-torch", "--checkpoint", str(path),
                                 "--out", out)
    assert code == 0, err
    assert '"step": 768000' in stdout and '"ema": "net_ema1"' in stdout
    assert json.loads(stdout)["step_from"].startswith("num_updates")
    assert os.path.exists(os.path.join(out, "checkpoints", "step-00768000.safetensors"))

    from meanflow.train import load_run
    for weights, prefix in (("ema", "net_ema1"), ("raw", "net")):
        model = load_run(out, weights).model
        own = model.state_dict()
        for k, v in nets[prefix].items():
            if not k.endswith("resample_filter"):
                assert torch.equal(own[k], v), k
        assert set(own) == {k for k in shapes if not k.endswith("resample_filter")}
    code, _, err = run(capsys, "sample", "--run", out, "--num", "2", "--out",
                       str(tmp_path / "c.npy"), "--threads", "1")
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "c.npy")).all()


def test_py_meanflow_step_is_the_optimizer_step():
    """py-meanflow: ``MeanFlow.update_ema`` raises the buffer ``num_updates`` once per optimizer
    step; ``train.py`` saves after epoch ``epoch`` ends; an epoch is ``len(DataLoader)`` steps,
    ``ceil(N / W) // B`` (DistributedSampler, drop_last=True), no gradient accumulation."""
    import argparse

    from meanflow.runs.authors import torch_step

    step, how = torch_step({"num_updates": torch.tensor(1234)}, 5, None)
    assert step == 1234 and how.startswith("num_updates")
    # cifar10_v1.sh: 8 GPUs x 128, 16,000 epochs; README: "800k iterations with batch 128x8"
    v1 = argparse.Namespace(dataset="cifar10", batch_size=128, world_size=8, test_run=False)
    assert torch_step({}, 15999, v1)[0] == 16_000 * 48 == 768_000
    assert torch_step({}, 0, v1)[0] == 48
    # train_arg_parser.py defaults: batch 64 on one process; MNIST has 60,000 images
    one = argparse.Namespace(dataset="mnist", batch_size=64, world_size=1)
    assert torch_step({}, 9, one)[0] == 10 * 937
    # three ranks: each is padded to ceil(50,000 / 3) = 16,667 rows
    three = argparse.Namespace(dataset="cifar10", batch_size=128, world_size=3)
    assert torch_step({}, 0, three)[0] == 130
    for args in (None, argparse.Namespace(dataset="cifar10"),
                 argparse.Namespace(dataset="cifar10", batch_size=128, world_size=8,
                                    test_run=True)):
        step, how = torch_step({}, 3, args)
        assert step == 0 and how.startswith("unknown") and "\n" not in how
    assert torch_step({}, None, v1)[0] == 0


def test_py_meanflow_unknown_step_is_said_in_one_line(tmp_path, capsys):
    import argparse

    pytest.importorskip("meanflow.nn.songunet")
    shapes = _py_meanflow_shapes()
    gen = torch.Generator().manual_seed(0)
    state = {f"net_ema.{k}": 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()
             if not k.endswith("resample_filter")}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "epoch": 7, "args": argparse.Namespace(arch="unet")}, path)
    code, stdout, err = _convert(capsys, "--from", "authors-torch", "--checkpoint", str(path),
                                 "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads(stdout)["step"] == 0
    assert len(err.strip().splitlines()) == 1 and "step unknown" in err
