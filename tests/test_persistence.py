"""Saving and loading SAEs: the native format (round trips, refusal of pickles, corrupt or mismatched folders)
and SAELens's format (reading folders written here by hand from SAELens's documented layout, checked against an
independent float64 re-implementation of SAELens's forward pass; exporting ours so that formula reproduces our
outputs)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_widgets.persistence import CONFIG, WEIGHTS, check_sae_fits_model, load_sae, save_sae
from sae_widgets.sae import ARCHS, SAE, SAEConfig
from sae_widgets.saelens_format import export_saelens, load_saelens

D_IN, D_SAE, K = 16, 32, 4
HOOK = "blocks.1.hook_resid_post"


def make_sae(arch: str, *, transcoder: bool = False, scales=(1.0, 1.0), seed: int = 0, d_out: int = 12) -> SAE:
    """A random SAE with non-trivial biases and thresholds; batchtopk/matryoshka get their threshold by training."""
    torch.manual_seed(seed)
    kw = {"k": K} if arch in ("topk", "batchtopk", "abstopk", "matryoshka") else {}
    if transcoder:
        kw.update(out_hook="blocks.1.hook_mlp_out", d_out=d_out)
    sae = SAE(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, hook=HOOK, model_name="embedded-test", **kw))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.2 * torch.randn_like(sae.b_enc))
        sae.b_dec.copy_(0.5 * torch.randn_like(sae.b_dec))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 0.8).log())
        sae.in_scale.fill_(scales[0])
        sae.out_scale.fill_(scales[1])
    if arch in ("batchtopk", "matryoshka"):
        sae.train()
        for _ in range(3):
            x = torch.randn(64, D_IN) / scales[0]
            sae.training_loss(x, torch.randn(64, d_out) if transcoder else None)
        assert float(sae.threshold) > 0
    return sae.eval()


def inputs(n: int = 64, seed: int = 1, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def state_equal(a: SAE, b: SAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ============================================================================================== native format
NATIVE_CASES = [(a, False) for a in ARCHS] + [(a, True) for a in ("relu", "topk", "batchtopk", "jumprelu")]


@pytest.mark.parametrize("arch,transcoder", NATIVE_CASES, ids=[f"{a}{'-tc' if t else ''}" for a, t in NATIVE_CASES])
def test_native_round_trip_identical_tensors_and_outputs(tmp_path, arch, transcoder):
    sae = make_sae(arch, transcoder=transcoder, scales=(0.7, 0.7 if not transcoder else 1.9))
    x = inputs(scale=1 / 0.7)
    save_sae(sae, tmp_path / "s", training={"lr": 3e-4, "steps": 10})
    back = load_sae(tmp_path / "s")
    assert back.cfg == sae.cfg and not back.training
    state_equal(sae, back)
    with torch.no_grad():
        (xh0, f0, _), (xh1, f1, _) = sae(x), back(x)
    assert torch.equal(xh0, xh1) and torch.equal(f0, f1)
    assert (f0 != 0).any() and (f0 == 0).any()  # the comparison is not vacuous


def test_native_thresholds_survive_reload_and_config_describes_the_sae(tmp_path):
    from sae_widgets import __version__

    btk, jr = make_sae("batchtopk", scales=(2.0, 2.0)), make_sae("jumprelu")
    for name, sae in (("btk", btk), ("jr", jr)):
        save_sae(sae, tmp_path / name, training={"lr": 1e-3, "batch_size": 64})
    b2, j2 = load_sae(tmp_path / "btk"), load_sae(tmp_path / "jr")
    assert float(b2.threshold) == float(btk.threshold) > 0
    assert torch.equal(j2.log_threshold, jr.log_threshold)
    x = inputs(scale=0.5)
    with torch.no_grad():
        assert torch.equal(b2(x)[0], btk(x)[0]) and torch.equal(j2(x)[0], jr(x)[0])
    meta = json.loads((tmp_path / "btk" / CONFIG).read_text())
    c = meta["config"]
    assert (c["arch"], c["d_in"], c["d_sae"], c["k"], c["hook"], c["model_name"]) == \
        ("batchtopk", D_IN, D_SAE, K, HOOK, "embedded-test")
    assert meta["normalization"] == {"in_scale": 2.0, "out_scale": 2.0}
    assert meta["thresholds"] == {"kind": "global", "value": float(btk.threshold)}
    assert meta["training"] == {"lr": 1e-3, "batch_size": 64}
    assert meta["sae_widgets_version"] == __version__
    jm = json.loads((tmp_path / "jr" / CONFIG).read_text())["thresholds"]
    theta = jr.log_threshold.detach().exp()
    assert jm["kind"] == "per_latent" and math.isclose(jm["min"], float(theta.min())) and \
        math.isclose(jm["max"], float(theta.max()))


@pytest.fixture
def torch_load_forbidden(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("torch.load was called: a pickle was unpickled")
    monkeypatch.setattr(torch, "load", boom)


@pytest.mark.parametrize("pickle_name", ["sae.pt", "pytorch_model.bin", "trainer_state.pt"])
def test_pickles_are_refused_without_unpickling(tmp_path, torch_load_forbidden, pickle_name):
    save_sae(make_sae("relu"), tmp_path / "n")
    export_saelens(make_sae("relu"), tmp_path / "l")
    for folder in (tmp_path / "n", tmp_path / "l"):
        (folder / pickle_name).write_bytes(b"\x80\x04K\x01.")  # a valid pickle of the int 1
    with pytest.raises(ValueError, match="pickle"):
        load_sae(tmp_path / "n")
    with pytest.raises(ValueError, match="pickle"):
        load_saelens(tmp_path / "l")
    with pytest.raises(ValueError, match="pickle"):  # the pickle file itself
        load_sae(tmp_path / "n" / pickle_name)


@pytest.fixture
def saved(tmp_path):
    save_sae(make_sae("topk"), tmp_path / "s")
    return tmp_path / "s"


def test_truncated_safetensors_is_a_clear_error(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(saved)


def test_invalid_json_is_a_clear_error(saved):
    (saved / CONFIG).write_text('{"format": "sae_widgets.sae/1", "config": {')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(saved)


def test_unknown_config_key_is_named(saved):
    meta = json.loads((saved / CONFIG).read_text())
    meta["config"]["expansion_factor"] = 8
    (saved / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown SAE config keys \['expansion_factor'\]"):
        load_sae(saved)


def test_missing_file_is_a_clear_error(saved):
    (saved / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_sae(saved)
    with pytest.raises(FileNotFoundError):
        load_sae(saved.parent / "nowhere")


def test_missing_tensor_is_named(saved):
    t = load_file(saved / WEIGHTS)
    del t["b_enc"]
    save_file(t, saved / WEIGHTS)
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]"):
        load_sae(saved)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
    t = load_file(saved / WEIGHTS)
    t["W_enc"] = torch.zeros(D_IN, D_SAE - 1)
    save_file(t, saved / WEIGHTS)
    with pytest.raises(ValueError, match="shape mismatch") as e:
        load_sae(saved)
    msg = str(e.value)
    assert "W_enc" in msg and str((D_IN, D_SAE - 1)) in msg and str((D_IN, D_SAE)) in msg


def test_sae_must_fit_the_models_hooks(model):
    def sae(d_in, hook, **kw):
        return SAE(SAEConfig(arch="relu", d_in=d_in, d_sae=8, hook=hook, **kw))

    check_sae_fits_model(sae(256, "blocks.0.hook_resid_post"), model)
    check_sae_fits_model(sae(256, "blocks.0.attn.hook_z"), model)  # 4 heads × 64, flattened
    with pytest.raises(ValueError, match=r"d_in=128.*blocks\.0\.hook_resid_post.*width 256"):
        check_sae_fits_model(sae(128, "blocks.0.hook_resid_post"), model)
    with pytest.raises(ValueError, match=r"d_in=64.*hook_z.*width 256"):
        check_sae_fits_model(sae(64, "blocks.0.attn.hook_z"), model)
    tc = dict(out_hook="blocks.0.hook_mlp_out")
    check_sae_fits_model(sae(256, "blocks.0.ln2.hook_normalized", d_out=256, **tc), model)
    with pytest.raises(ValueError, match=r"d_out=200.*blocks\.0\.hook_mlp_out.*width 256"):
        check_sae_fits_model(sae(256, "blocks.0.ln2.hook_normalized", d_out=200, **tc), model)
    with pytest.raises(ValueError, match=r"d_out=256.*mlp\.hook_post.*width 1024"):
        check_sae_fits_model(sae(256, "blocks.0.ln2.hook_normalized", d_out=256, out_hook="blocks.0.mlp.hook_post"), model)
    with pytest.raises(ValueError, match="4 layers"):
        check_sae_fits_model(sae(256, "blocks.7.hook_resid_post"), model)


# ============================================================================================== SAELens format
def write_saelens(folder, cfg: dict, tensors: dict[str, torch.Tensor]) -> None:
    """An SAELens folder as SAELens writes it: json.dump(cfg) + safetensors' save_file(state_dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))


def saelens_forward(cfg: dict, tensors: dict[str, torch.Tensor], x: torch.Tensor, norm_factor: float | None = None):
    """SAELens's inference forward, re-implemented from its source in float64: returns (x̂, latents)."""
    t = {k: v.double() for k, v in tensors.items()}
    W_enc, W_dec, b_enc, b_dec = t["W_enc"], t["W_dec"], t["b_enc"], t["b_dec"]
    version = cfg.get("sae_lens_version") or cfg.get("metadata", {}).get("sae_lens_version")
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if not version or int(version.split(".")[0]) < 6:  # pre-6.0: topk was an activation_fn of "standard"
        if cfg.get("activation_fn_str", cfg.get("activation_fn")) == "topk":
            arch, k = "topk", cfg["activation_fn_kwargs"]["k"]
    norm = cfg.get("normalize_activations", "none")
    if norm in ("expected_average_only_in", True):  # from_pretrained folds the factor into the weights
        W_enc, W_dec, b_dec = W_enc * norm_factor, W_dec / norm_factor, b_dec / norm_factor
    transcoder = arch.endswith("transcoder")
    sae_in = x.double()
    if not transcoder and cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - b_dec
    h = sae_in @ W_enc + b_enc
    rescale = cfg.get("rescale_acts_by_decoder_norm", arch == "batchtopk") and arch in ("topk", "batchtopk")
    if rescale:
        h = h * W_dec.norm(dim=-1)
    if arch in ("standard", "transcoder"):
        f = torch.relu(h)
    elif arch == "topk":
        vals, idx = torch.topk(h, k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))
    elif arch in ("jumprelu", "jumprelu_transcoder"):
        f = torch.relu(h) * (h > t["threshold"])
    elif arch == "batchtopk":  # inference form SAELens saves: JumpReLU at topk_threshold for every latent
        f = torch.relu(h) * (h > t["topk_threshold"])
    else:
        raise AssertionError(arch)
    g = f / W_dec.norm(dim=-1) if rescale else f
    if "scaling_factor" in t:
        g = g * t["scaling_factor"]
    return g @ W_dec + b_dec, f


def v6_cfg(arch: str, **extra) -> dict:
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
           "metadata": {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0",
                        "model_name": "tiny-model", "hook_name": HOOK, "context_size": 128, "prepend_bos": True}}
    meta = extra.pop("metadata", {})
    cfg.update(extra)
    cfg["metadata"].update(meta)
    return cfg


def random_tensors(seed: int = 3, d_out: int = D_IN, threshold: bool = False, **extra) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 3, "W_dec": torch.randn(D_SAE, d_out, generator=g) / 4,
         "b_enc": 0.1 * torch.randn(D_SAE, generator=g), "b_dec": 0.3 * torch.randn(d_out, generator=g)}
    if threshold:
        th = torch.rand(D_SAE, generator=g) * 0.6
        th[:2] = torch.tensor([0.0, -0.2])  # θ ≤ 0: SAELens's ReLU(z)·[z > θ] is then plain ReLU
        t["threshold"] = th
    t.update(extra)
    return t


LEGACY = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
          "hook_point": HOOK, "hook_point_layer": 1, "hook_point_head_index": None, "context_size": 128,
          "sae_lens_training_version": "3.0.0", "normalize_activations": False}

SCALER = 2.5
LOAD_CASES = {
    "standard": (v6_cfg("standard"), dict()),
    "topk": (v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=False), dict()),
    "jumprelu": (v6_cfg("jumprelu"), dict(threshold=True)),
    "standard-no-bdec-in": (v6_cfg("standard", apply_b_dec_to_input=False), dict()),
    "jumprelu-no-bdec-in": (v6_cfg("jumprelu", apply_b_dec_to_input=False), dict(threshold=True)),
    "topk-rescaled-by-decoder-norm": (v6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True), dict()),
    "batchtopk-checkpoint": (v6_cfg("batchtopk", k=float(K), rescale_acts_by_decoder_norm=True,
                                    topk_threshold_lr=0.01, l1_coefficient=1.0),
                             dict(topk_threshold=torch.tensor(0.15, dtype=torch.float64))),
    "expected-average-norm": (v6_cfg("standard", normalize_activations="expected_average_only_in"), dict()),
    "hook_z": (v6_cfg("topk", k=K, reshape_activations="hook_z", metadata={"hook_name": "blocks.0.attn.hook_z"}),
               dict()),
    "legacy-relu": ({**LEGACY, "architecture": "standard", "activation_fn_str": "relu",
                     "apply_b_dec_to_input": True, "finetuning_scaling_factor": False}, dict()),
    "legacy-topk": ({**LEGACY, "architecture": "standard", "activation_fn_str": "topk",
                     "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True}, dict()),
    "legacy-jumprelu-finetuning-scale": ({**LEGACY, "architecture": "jumprelu", "activation_fn_str": "relu",
                                          "apply_b_dec_to_input": False, "finetuning_scaling_factor": True},
                                         dict(threshold=True, scaling_factor=torch.linspace(0.5, 1.5, D_SAE))),
    "legacy-bool-normalize": ({**LEGACY, "activation_fn": "relu", "normalize_activations": True}, dict()),
    "transcoder": (v6_cfg("transcoder", d_out=12, apply_b_dec_to_input=False,
                          metadata={"hook_name_out": "blocks.1.hook_mlp_out"}), dict(d_out=12)),
    "jumprelu-transcoder": (v6_cfg("jumprelu_transcoder", d_out=12, apply_b_dec_to_input=False,
                                   metadata={"hook_name_out": "blocks.1.hook_mlp_out"}), dict(d_out=12, threshold=True)),
}
EXPECTED_ARCH = {"standard": "relu", "transcoder": "relu", "topk": "topk", "jumprelu": "jumprelu",
                 "jumprelu_transcoder": "jumprelu", "batchtopk": "batchtopk"}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_saelens_matches_an_independent_saelens_forward(tmp_path, case):
    cfg, tkw = LOAD_CASES[case]
    tensors = random_tensors(**tkw)
    write_saelens(tmp_path / case, cfg, tensors)
    factor = SCALER if cfg.get("normalize_activations") in ("expected_average_only_in", True) else None
    if factor and case == "legacy-bool-normalize":
        (tmp_path / case / "activation_scaler.json").write_text(json.dumps({"scaling_factor": SCALER}))
        sae = load_saelens(tmp_path / case)  # the factor comes from the checkpoint's activation_scaler.json
    else:
        sae = load_saelens(tmp_path / case, norm_scaling_factor=factor)
    x = 2 * torch.randn(200, D_IN, generator=torch.Generator().manual_seed(9))
    ref_out, ref_f = saelens_forward(cfg, tensors, x, norm_factor=factor)
    with torch.no_grad():
        out, f, _ = sae(x)
    assert (ref_f != 0).any() and (ref_f == 0).any()
    torch.testing.assert_close(f.double(), ref_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    arch = cfg.get("architecture", "standard")
    assert sae.cfg.arch == ("topk" if case == "legacy-topk" else EXPECTED_ARCH[arch])
    assert sae.cfg.hook == cfg.get("metadata", {}).get("hook_name", cfg.get("hook_point"))
    assert sae.cfg.model_name == cfg.get("metadata", {}).get("model_name", cfg.get("model_name"))
    assert sae.cfg.is_transcoder == ("transcoder" in arch)
    if sae.cfg.is_transcoder:
        assert sae.cfg.out_hook == "blocks.1.hook_mlp_out" and sae.cfg.d_out == 12
    if sae.cfg.arch in ("topk", "batchtopk"):
        assert sae.cfg.k == K
    if factor:
        assert float(sae.in_scale) == float(sae.out_scale) == pytest.approx(SCALER)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_export_of_a_loaded_saelens_folder_reproduces_its_tensors(tmp_path, arch):
    cfg, tkw = LOAD_CASES[arch]
    tensors = random_tensors(**tkw)
    tensors.get("threshold", torch.ones(1)).clamp_(min=0.01)  # θ ≤ 0 is stored as 0, tested elsewhere
    write_saelens(tmp_path / "orig", cfg, tensors)
    export_saelens(load_saelens(tmp_path / "orig"), tmp_path / "again")
    back = load_file(tmp_path / "again" / "sae_weights.safetensors")
    assert back.keys() == tensors.keys()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(back[name], tensors[name]), name
    if "threshold" in tensors:  # stored as log θ: exp(log θ) is θ up to float32 rounding
        torch.testing.assert_close(back["threshold"], tensors["threshold"], rtol=2e-7, atol=0)
    out_cfg = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert out_cfg["architecture"] == arch and out_cfg["d_in"] == D_IN and out_cfg["d_sae"] == D_SAE
    assert out_cfg["metadata"]["hook_name"] == HOOK and out_cfg["metadata"]["model_name"] == "tiny-model"
    assert out_cfg["apply_b_dec_to_input"] is True and out_cfg["normalize_activations"] == "none"
    assert out_cfg.get("k") == (K if arch == "topk" else None)
    assert not list((tmp_path / "again").glob("*.tmp"))


EXPORTED_AS = {("relu", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
               ("batchtopk", False): "jumprelu", ("relu", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder",
               ("batchtopk", True): "jumprelu_transcoder"}
EXPORT_CASES = [("relu", False), ("topk", False), ("jumprelu", False), ("batchtopk", False),
                ("relu", True), ("jumprelu", True), ("batchtopk", True)]


@pytest.mark.parametrize("scales", [(0.4, 0.4), (0.4, 2.5)], ids=["same-scale", "in!=out"])
@pytest.mark.parametrize("arch,transcoder", EXPORT_CASES, ids=[f"{a}{'-tc' if t else ''}" for a, t in EXPORT_CASES])
def test_export_folds_normalisation_so_saelens_forward_gives_our_outputs(tmp_path, arch, transcoder, scales):
    sae = make_sae(arch, transcoder=transcoder, scales=scales)
    export_saelens(sae, tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    tensors = load_file(tmp_path / "e" / "sae_weights.safetensors")
    assert cfg["normalize_activations"] == "none"
    assert cfg["architecture"] == EXPORTED_AS[arch, transcoder]
    if transcoder:
        assert cfg["d_out"] == 12 and cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert cfg["apply_b_dec_to_input"] is False
    x = inputs(200, scale=1 / scales[0])
    ref_out, ref_f = saelens_forward(cfg, tensors, x)
    with torch.no_grad():
        out, f, _ = sae(x)
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(f.double(), ref_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and reading the export back gives our outputs too
        torch.testing.assert_close(load_saelens(tmp_path / "e")(x)[0], out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,transcoder", [("abstopk", False), ("matryoshka", False), ("topk", True)])
def test_export_refuses_architectures_saelens_lacks(tmp_path, arch, transcoder):
    with pytest.raises(ValueError, match=f"cannot export a {arch}( transcoder| SAE) to SAELens"):
        export_saelens(make_sae(arch, transcoder=transcoder), tmp_path / "x")
    assert not (tmp_path / "x" / "cfg.json").exists()


def test_export_refuses_a_batchtopk_sae_without_threshold(tmp_path):
    sae = SAE(SAEConfig(arch="batchtopk", d_in=D_IN, d_sae=D_SAE, k=K))
    with pytest.raises(ValueError, match="no inference threshold"):
        export_saelens(sae, tmp_path / "x")


def _load_error(tmp_path, cfg, tensors, match, exc=ValueError, **kw):
    write_saelens(tmp_path / "bad", cfg, tensors)
    with pytest.raises(exc, match=match):
        load_saelens(tmp_path / "bad", **kw)


def test_load_saelens_refuses_unsupported_architectures(tmp_path):
    tensors = {**random_tensors(), "b_gate": torch.zeros(D_SAE), "r_mag": torch.zeros(D_SAE)}
    _load_error(tmp_path, v6_cfg("gated"), tensors,
                r"architecture 'gated' is not supported; supported architectures: .*'jumprelu'.*'standard'.*'topk'")
    _load_error(tmp_path, {**LEGACY, "activation_fn_str": "tanh-relu"}, random_tensors(), "'tanh-relu' is not supported")


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_load_saelens_refuses_per_input_normalisation(tmp_path, norm):
    _load_error(tmp_path, v6_cfg("standard", normalize_activations=norm), random_tensors(),
                f"normalize_activations='{norm}'.*cannot represent")


def test_load_saelens_needs_the_expected_average_factor(tmp_path):
    _load_error(tmp_path, v6_cfg("standard", normalize_activations="expected_average_only_in"), random_tensors(),
                "norm_scaling_factor")


def test_load_saelens_names_missing_keys_tensors_and_bad_shapes(tmp_path):
    cfg = v6_cfg("jumprelu")
    del cfg["d_sae"]
    _load_error(tmp_path, cfg, random_tensors(threshold=True), r"missing config key\(s\) \['d_sae'\]")
    _load_error(tmp_path, v6_cfg("jumprelu"), random_tensors(), r"missing tensors \['threshold'\]")
    _load_error(tmp_path, v6_cfg("topk"), random_tensors(), "k=None")
    _load_error(tmp_path, v6_cfg("standard"), random_tensors(W_skip=torch.zeros(D_IN, D_IN)),
                r"unexpected tensors \['W_skip'\]")
    bad = random_tensors(W_dec=torch.zeros(D_SAE, D_IN + 1))
    _load_error(tmp_path, v6_cfg("standard"), bad, r"shape mismatch.*'W_dec': \(\(32, 17\), \(32, 16\)\)")
    _load_error(tmp_path, v6_cfg("standard", metadata={"hook_head_index": 3}), random_tensors(), "hook_head_index=3")
    _load_error(tmp_path, v6_cfg("transcoder", d_out=D_IN, apply_b_dec_to_input=False), random_tensors(),
                "hook_name_out")


def test_load_saelens_corrupt_or_missing_files(tmp_path, torch_load_forbidden):
    write_saelens(tmp_path / "f", v6_cfg("standard"), random_tensors())
    data = (tmp_path / "f" / "sae_weights.safetensors").read_bytes()
    (tmp_path / "f" / "sae_weights.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_saelens(tmp_path / "f")
    (tmp_path / "f" / "cfg.json").write_text("{'d_in': 16")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_saelens(tmp_path / "f")
    (tmp_path / "f" / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path / "f")
    (tmp_path / "f" / "sae_weights.pt").write_bytes(b"\x80\x04K\x01.")  # older SAELens checkpoints were pickles
    with pytest.raises(ValueError, match="pickle"):
        load_saelens(tmp_path / "f")


def test_malformed_config_json_and_unserialisable_training_leave_no_mixed_folder(tmp_path):
    import json as _json

    from sae_widgets.persistence import load_sae as _load, save_sae as _save
    from sae_widgets.sae import SAE as _SAE, SAEConfig as _Cfg

    sae = _SAE(_Cfg(arch="topk", d_in=8, d_sae=16, k=2))
    folder = _save(sae, tmp_path / "s")
    (folder / "sae_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object with a 'config' object"):
        _load(folder)
    (folder / "sae_config.json").write_text(_json.dumps({"format": "sae_widgets.sae/1"}))
    with pytest.raises(ValueError, match="without config"):
        _load(folder)
    good = _save(sae, tmp_path / "g")
    before = (good / "sae.safetensors").read_bytes()
    other = _SAE(_Cfg(arch="topk", d_in=8, d_sae=16, k=3))
    with pytest.raises(TypeError):
        _save(other, good, training={"path": tmp_path})  # a Path is not JSON: nothing may be written
    assert (good / "sae.safetensors").read_bytes() == before and _load(good).cfg.k == 2


# ============================================================================================== integrity
def strip_digests(weights) -> None:
    """Rewrite a safetensors file without header metadata, as files written before digests existed."""
    save_file(load_file(weights), weights)


def edit_json(path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=1))


@pytest.mark.parametrize("arch,transcoder", [("topk", False), ("jumprelu", False), ("batchtopk", True)])
def test_folders_written_before_digests_load_exactly_as_before(tmp_path, arch, transcoder):
    from sae_widgets.atomic import safetensors_metadata

    sae = make_sae(arch, transcoder=transcoder, scales=(0.7, 1.3))
    save_sae(sae, tmp_path / "n", training={"lr": 1e-3})
    export_saelens(sae, tmp_path / "l")
    with_digest = load_saelens(tmp_path / "l")
    for weights in (tmp_path / "n" / WEIGHTS, tmp_path / "l" / "sae_weights.safetensors"):
        assert "sae_widgets.config_sha256" in safetensors_metadata(weights)
        strip_digests(weights)
        assert safetensors_metadata(weights) == {}
    back = load_sae(tmp_path / "n")
    assert back.cfg == sae.cfg
    state_equal(sae, back)
    old_lens = load_saelens(tmp_path / "l")
    assert old_lens.cfg == with_digest.cfg
    state_equal(old_lens, with_digest)


def test_edited_native_config_is_refused_but_the_training_record_may_change(tmp_path):
    sae = make_sae("topk", scales=(0.5, 0.5))
    folder = save_sae(sae, tmp_path / "s", training={"lr": 1e-3})
    edit_json(folder / CONFIG, lambda m: m["training"].update(lr=5.0, note="edited by hand"))
    back = load_sae(folder)  # indentation and the training record are free
    assert back.cfg == sae.cfg
    state_equal(sae, back)
    edits = [lambda m: m["config"].update(k=K - 1), lambda m: m["config"].update(hook="blocks.0.hook_resid_pre"),
             lambda m: m["normalization"].update(in_scale=1.0), lambda m: m.update(thresholds={"kind": "global"})]
    for edit in edits:
        save_sae(sae, folder)
        edit_json(folder / CONFIG, edit)
        with pytest.raises(ValueError, match=rf"{CONFIG} does not match the weights it was saved with"):
            load_sae(folder)


def test_edited_saelens_cfg_is_refused_but_informational_metadata_may_change(tmp_path):
    sae = make_sae("topk")
    folder = export_saelens(sae, tmp_path / "l")
    reference = load_saelens(folder)
    edit_json(folder / "cfg.json", lambda c: c["metadata"].update(exported_by="someone", context_size=128))
    state_equal(load_saelens(folder), reference)
    edits = [lambda c: c.update(k=K - 1), lambda c: c["metadata"].update(hook_name="blocks.0.hook_resid_pre"),
             lambda c: c.update(dtype="bfloat16")]
    for edit in edits:
        export_saelens(sae, folder)
        edit_json(folder / "cfg.json", edit)
        with pytest.raises(ValueError, match="cfg.json does not match the weights it was exported with"):
            load_saelens(folder)


def test_a_flipped_weight_byte_is_refused_naming_the_file(saved):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-40] ^= 0x01  # inside b_enc / W_enc data: still a well-formed safetensors file
    (saved / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{WEIGHTS} is corrupt"):
        load_sae(saved)


def test_non_utf8_config_is_a_value_error_naming_the_file(saved):
    (saved / CONFIG).write_bytes((saved / CONFIG).read_bytes().replace(b'"topk"', b'"top\xffk"'))
    with pytest.raises(ValueError, match=rf"{CONFIG} is not UTF-8"):
        load_sae(saved)


BAD_VALUES = [("d_sae", "abc"), ("d_sae", [32]), ("d_sae", None), ("d_in", 16.5), ("d_in", True), ("k", "4"),
              ("arch", 3), ("normalize", "yes"), ("hook", None), ("matryoshka_prefixes", "x"), ("d_out", -3),
              ("jumprelu_init_threshold", 0.0), ("d_in", None)]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_wrong_config_types_and_values_are_value_errors_naming_the_file(tmp_path, key, value):
    arch = "jumprelu" if key == "jumprelu_init_threshold" else "topk"
    folder = save_sae(make_sae(arch), tmp_path / "s")
    edit_json(folder / CONFIG, lambda m: m["config"].update({key: value}) if value is not None or key != "d_in"
              else m["config"].pop("d_in"))
    with pytest.raises(ValueError, match=CONFIG):
        load_sae(folder)


SAELENS_BAD = {
    "architecture-list": (v6_cfg(["topk"]), None),
    "kwargs-list": ({**LEGACY, "activation_fn_str": "topk", "activation_fn_kwargs": [4]}, None),
    "hook-number": (v6_cfg("standard", metadata={"hook_name": 5}), None),
    "model-name-list": (v6_cfg("standard", metadata={"model_name": ["a"]}), None),
    "d_sae-string": (v6_cfg("standard", d_sae="abc"), None),
    "scaler-list": (v6_cfg("standard", normalize_activations="expected_average_only_in"), [2.5]),
    "scaler-string": (v6_cfg("standard", normalize_activations="expected_average_only_in"), {"scaling_factor": "x"}),
}


@pytest.mark.parametrize("case", list(SAELENS_BAD))
def test_wrong_saelens_cfg_types_are_value_errors_naming_the_file(tmp_path, case):
    cfg, scaler = SAELENS_BAD[case]
    write_saelens(tmp_path / "l", cfg, random_tensors())
    name = "cfg.json"
    if scaler is not None:
        (tmp_path / "l" / "activation_scaler.json").write_text(json.dumps(scaler))
        name = "activation_scaler.json"
    with pytest.raises(ValueError, match=name):
        load_saelens(tmp_path / "l")


@pytest.mark.parametrize("key", ["sae_widgets.sha256", "sae_widgets.config_sha256"])
@pytest.mark.parametrize("kind", ["native", "saelens"])
def test_a_damaged_digest_key_name_does_not_switch_the_checks_off(tmp_path, kind, key):
    """One flip renames a digest key (as if the file had none), another changes a weight: still refused."""
    sae = make_sae("topk")
    folder = save_sae(sae, tmp_path / "s") if kind == "native" else export_saelens(sae, tmp_path / "s")
    weights = folder / (WEIGHTS if kind == "native" else "sae_weights.safetensors")
    data = bytearray(weights.read_bytes())
    at = data.index(key.encode() + b'"') + len(key) - 1  # the key's last character
    data[at] ^= 0x01
    data[-40] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{weights.name} has a damaged header"):
        (load_sae if kind == "native" else load_saelens)(folder)
