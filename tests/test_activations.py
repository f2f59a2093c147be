"""Activation store: values against run_with_cache on the full model, hook coverage, early stop, shuffling,
disk cache, resume and bad input. Tiny shapes: contexts of 16-32 tokens, buffers of a few hundred rows."""
from __future__ import annotations


import pytest
import torch

from sae_widgets.activations import ActivationStore, ModelRows, read_manifest, write_activation_cache
from sae_widgets.token_sources import EmbeddedCorpus, HFDataset, TextFiles, TokenArray
from sae_widgets.tokens import chunk_windows, join_documents

N_CTX = 16


def reference_rows(model, hooks, windows, drop_bos=True):
    """Activations of `windows` at `hooks` from a plain full-model run_with_cache, flattened to rows."""
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=lambda n: n in hooks)
    parts = []
    for h in hooks:
        a = cache[h].reshape(*windows.shape, -1)
        parts.append(a[:, 1:] if drop_bos else a)
    rows = torch.cat(parts, dim=-1)
    return rows.reshape(-1, rows.shape[-1])


def nearest(rows, ref):
    """Index of the nearest reference row for each row (exact distances, not the matmul shortcut)."""
    return torch.cdist(rows, ref, compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)


def stream_windows(model, n_windows, n_ctx=N_CTX):
    """The first windows the store cuts from the embedded train split, rebuilt by hand."""
    from sae_widgets.corpus import load_texts

    tok = model.tokenizer
    docs = []
    for text in load_texts("train"):
        docs.append(tok(text, add_special_tokens=False)["input_ids"])
        if sum(map(len, docs)) > n_windows * n_ctx:
            break
    return chunk_windows(join_documents(docs, tok.eos_token_id), n_ctx, tok.bos_token_id)[:n_windows]


def make_store(model, hooks, **kw):
    args = dict(n_ctx=N_CTX, batch_size=64, model_batch_size=4, buffer_size=256, seed=0, show_progress=False)
    args.update(kw)
    return ActivationStore(model, hooks, **args)


def take(store, n):
    return [store.next_batch() for _ in range(n)]


HOOKS = {
    "resid_pre": ("blocks.0.hook_resid_pre", 256),
    "resid_mid": ("blocks.1.hook_resid_mid", 256),
    "resid_post": ("blocks.2.hook_resid_post", 256),
    "mlp_in": ("blocks.1.ln2.hook_normalized", 256),
    "mlp_out": ("blocks.1.hook_mlp_out", 256),
    "attn_out": ("blocks.3.hook_attn_out", 256),
    "hook_z": ("blocks.2.attn.hook_z", 4 * 64),
}


@pytest.mark.parametrize("kind", list(HOOKS))
def test_rows_equal_full_model_cache(model, kind):
    hook, d = HOOKS[kind]
    store = make_store(model, hook, shuffle=False)
    assert store.d_in == d
    got = torch.cat(take(store, 4))  # 256 rows = 17+ windows of 15 rows
    windows = stream_windows(model, 20)
    ref = reference_rows(model, [hook], windows)[: len(got)]
    assert got.shape == (256, d) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_transcoder_pair_rows_stay_aligned_after_shuffle(model):
    pair = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    store = make_store(model, pair, shuffle=True)
    assert (store.d_in, store.d_out) == (256, 256)
    x, y = store.next_batch()
    assert x.shape == y.shape == (64, 256)
    ref = reference_rows(model, list(pair), stream_windows(model, 30))
    ref_x, ref_y = ref[:, :256], ref[:, 256:]
    idx = nearest(x, ref_x)  # each shuffled input row is one of the reference rows ...
    torch.testing.assert_close(x, ref_x[idx], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref_y[idx], rtol=1e-5, atol=1e-5)  # ... and carries its own output row
    assert not torch.equal(idx, torch.arange(64)), "rows were not shuffled"


def count_block_calls(model):
    counts = [0] * model.cfg.n_layers
    handles = [blk.register_forward_hook(lambda m, i, o, k=k: counts.__setitem__(k, counts[k] + 1))
               for k, blk in enumerate(model.blocks)]
    return counts, handles


@pytest.mark.parametrize("hook,ran", [("blocks.1.hook_resid_post", [1, 1, 0, 0]), ("hook_embed", [0, 0, 0, 0]),
                                      ("blocks.3.hook_mlp_out", [1, 1, 1, 1]), ("ln_final.hook_normalized", [1, 1, 1, 1])])
def test_model_runs_only_up_to_the_needed_layer(model, hook, ran):
    store = make_store(model, hook, model_batch_size=4, buffer_size=64)
    counts, handles = count_block_calls(model)
    try:
        store.next_batch()
        calls = list(counts)
    finally:
        for h in handles:
            h.remove()
    n_forward = store.rows.windows_done // 4
    assert [int(c > 0) for c in calls] == ran
    assert all(c == n_forward for c, r in zip(calls, ran) if r)


def test_shuffled_batches_mix_rows_and_are_seeded(model):
    hook = "blocks.0.hook_resid_post"
    plain = torch.cat(take(make_store(model, hook, shuffle=False), 4))  # the first 256 rows, in order
    a = take(make_store(model, hook, seed=1), 2)
    b = take(make_store(model, hook, seed=1), 2)
    c = take(make_store(model, hook, seed=2), 2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    first = a[0]
    # every shuffled row comes from the first buffer-full of rows, but not in stream order
    idx = nearest(first, plain)
    assert torch.equal(first, plain[idx])  # same windows, same model batches: bit-identical rows
    assert not torch.equal(first, plain[:64])
    assert idx.max() > 128, "a batch should draw from across the whole buffer"


def test_disk_cache_round_trip_identical_to_memory(model, tmp_path):
    hook = "blocks.1.hook_resid_post"
    cache = write_activation_cache(model, hook, tmp_path / "cache", n_tokens=1000, n_ctx=N_CTX, model_batch_size=4,
                                   shard_tokens=300, seed=3, show_progress=False)
    man = read_manifest(cache)
    assert man["complete"] and man["n_rows"] == 1000 and len(man["shards"]) == 4
    assert man["hooks"] == [hook] and man["seed"] == 3 and man["n_tokens"] == 1000
    assert man["model"] == "sotu-moby-4l" and man["dataset"] == {"kind": "embedded_corpus", "split": "train"}
    mem = make_store(model, hook, seed=3)
    disk = ActivationStore.from_cache(cache, batch_size=64, buffer_size=256, seed=3, show_progress=False)
    for _ in range(10):  # 640 rows: several refills, across shard boundaries
        assert torch.equal(mem.next_batch(), disk.next_batch())


def test_disk_cache_resumes_after_interrupt(model, tmp_path, monkeypatch):
    hook = ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    kw = dict(n_tokens=600, n_ctx=N_CTX, model_batch_size=4, shard_tokens=120, show_progress=False)
    whole = write_activation_cache(model, hook, tmp_path / "whole", **kw)
    real, calls = ModelRows.next_rows, {"n": 0}

    def dies_after_six(self):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ModelRows, "next_rows", dies_after_six)
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(model, hook, tmp_path / "resumed", **kw)
    partial = read_manifest(tmp_path / "resumed")
    assert not partial["complete"] and 0 < partial["n_rows"] < 600
    assert len(partial["shards"]) == len(list((tmp_path / "resumed").glob("shard_*.safetensors")))
    monkeypatch.setattr(ModelRows, "next_rows", real)
    write_activation_cache(model, hook, tmp_path / "resumed", **kw)
    a = ActivationStore.from_cache(whole, batch_size=100, buffer_size=600, shuffle=False, show_progress=False)
    b = ActivationStore.from_cache(tmp_path / "resumed", batch_size=100, buffer_size=600, shuffle=False, show_progress=False)
    for _ in range(6):
        for u, v in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(u, v)
    with pytest.raises(ValueError, match="other settings"):
        write_activation_cache(model, hook, tmp_path / "resumed", **{**kw, "n_ctx": 32})


def test_state_dict_resumes_the_same_batches(model):
    hook = "blocks.0.hook_resid_post"
    a = make_store(model, hook, seed=5)
    take(a, 3)
    state = a.state_dict()
    expected = take(a, 5)
    b = make_store(model, hook, seed=5)
    b.load_state_dict(state)
    for x, y in zip(expected, take(b, 5)):
        assert torch.equal(x, y)


def test_windows_start_with_bos_and_bos_rows_are_explicit(model):
    tok = model.tokenizer
    rows = ModelRows(model, ["blocks.0.hook_resid_pre"], EmbeddedCorpus("train"), n_ctx=N_CTX, prepend_bos=True,
                     keep_bos_rows=False, model_batch_size=2, dtype=torch.float32)
    w = next(rows._window_iter())
    assert len(w) == N_CTX and w[0] == tok.bos_token_id and tok.bos_token_id not in w[1:3]
    assert len(rows.next_rows()) == 2 * (N_CTX - 1)
    kept = make_store(model, "blocks.0.hook_resid_pre", keep_bos_rows=True, shuffle=False)
    got = kept.next_batch()
    ref = reference_rows(model, ["blocks.0.hook_resid_pre"], stream_windows(model, 4), drop_bos=False)
    torch.testing.assert_close(got, ref[:64], rtol=1e-5, atol=1e-5)
    no_bos = make_store(model, "blocks.0.hook_resid_pre", prepend_bos=False, shuffle=False)
    assert no_bos.rows.rows_per_window == N_CTX


def test_text_files_and_token_arrays_and_hf_datasets(model, tmp_path):
    tok = model.tokenizer
    texts = ["Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 3,
             "Fellow-Citizens of the Senate and House of Representatives: the state of the Union is strong. " * 3]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    windows = chunk_windows(join_documents(ids, tok.eos_token_id), N_CTX, tok.bos_token_id)
    ref = reference_rows(model, ["blocks.0.hook_resid_post"], windows)
    n = len(ref) // 2
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f, t in zip(files, texts):
        f.write_text(t, encoding="utf-8")
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts})
    ds.save_to_disk(str(tmp_path / "ds"))
    pretok = datasets.Dataset.from_dict({"input_ids": ids})
    sources = {"files": TextFiles(files), "array_1d": TokenArray(torch.tensor(ids[0][:40] + [tok.eos_token_id])),
               "hf_disk": HFDataset(str(tmp_path / "ds")), "hf_obj": HFDataset(ds), "hf_pretok": HFDataset(pretok)}
    for name, src in sources.items():
        store = make_store(model, "blocks.0.hook_resid_post", source=src, batch_size=n, buffer_size=n, shuffle=False)
        got = store.next_batch()
        if name == "array_1d":  # one stream: the array followed by the separator the store adds
            w = chunk_windows(torch.tensor(ids[0][:40] + [tok.eos_token_id, tok.eos_token_id]), N_CTX, tok.bos_token_id)
            r = reference_rows(model, ["blocks.0.hook_resid_post"], w)
            torch.testing.assert_close(got[: len(r)], r, rtol=1e-5, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(got, ref[:n], rtol=1e-5, atol=1e-5, msg=name)
    two_d = TokenArray(torch.tensor([ids[0][:30], ids[1][:30]]))
    store = make_store(model, "blocks.0.hook_resid_post", source=two_d, batch_size=30, buffer_size=30, shuffle=False)
    w = chunk_windows(join_documents([ids[0][:30], ids[1][:30]], tok.eos_token_id), N_CTX, tok.bos_token_id)
    torch.testing.assert_close(store.next_batch(), reference_rows(model, ["blocks.0.hook_resid_post"], w)[:30],
                               rtol=1e-5, atol=1e-5)


def test_bad_input_gives_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hook name 'blocks.1.hook_resid_pots'.*Did you mean 'blocks.1.hook_resid_post'.*blocks\.\{0\.\.3\}\.hook_mlp_out"):
        make_store(model, "blocks.1.hook_resid_pots")
    with pytest.raises(ValueError, match=r"layer 7, but the model has 4 layers \(0\.\.3\)"):
        make_store(model, "blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="n_ctx=300 is longer than the model's context of 256"):
        make_store(model, "blocks.0.hook_resid_post", n_ctx=300)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        make_store(model, "blocks.0.hook_resid_post", source=TextFiles([empty])).next_batch()
    with pytest.raises(ValueError, match="is empty"):
        make_store(model, "blocks.0.hook_resid_post", source=TokenArray(torch.zeros(0, dtype=torch.long))).next_batch()
    with pytest.raises(FileNotFoundError, match="not found"):
        TextFiles([tmp_path / "nope.txt"])
    with pytest.raises(ValueError, match="outside the model's vocabulary of 4096"):
        make_store(model, "blocks.0.hook_resid_post", source=TokenArray(torch.tensor([1, 2, 99999]))).next_batch()
    with pytest.raises(ValueError, match="not \\[batch, position"):
        make_store(model, "blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match="batch_size=512, buffer_size=256"):
        make_store(model, "blocks.0.hook_resid_post", batch_size=512)
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        ActivationStore.from_cache(tmp_path)
