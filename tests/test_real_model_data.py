"""The data path on models that are not the embedded one: an optional tokenizer, the real BOS, special tokens and
massive-norm rows.

Models are tiny random Llama folders (`real_arch_models.tiny_model_folder`), saved with the embedded tokenizer, with
none, or with a chat tokenizer whose bos / eos are turn markers (`<|im_start|>` / `<|im_end|>`, as SmolLM2-Instruct's)
while `<|endoftext|>` (id 0) is the pretraining document token. References are computed by hand from the model's own
activations (`run_to_hooks`) and the tokens.
"""
from __future__ import annotations

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from real_arch_models import TOKENIZER_DIR, tiny_model_folder
from sae_widgets.activations import ActivationStore, ModelRows, read_manifest, run_to_hooks, write_activation_cache
from sae_widgets.metrics import evaluate, reconstruction_metrics
from sae_widgets.models import load_model
from sae_widgets.runs import RunConfig
from sae_widgets.sae import SAE, SAEConfig
from sae_widgets.token_sources import EmbeddedCorpus, TokenArray

HOOK = "blocks.1.hook_resid_post"
N_CTX = 16
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
MASSIVE_ID = 77  # the token whose embedding row is scaled up in the `massive` model


def docs(n_docs: int = 12, length: int = 11, seed: int = 0) -> torch.Tensor:
    """Documents of ordinary ids (none special, none MASSIVE_ID): one per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 4000, (n_docs, length), generator=g)
    return torch.where(ids == MASSIVE_ID, ids + 1, ids)


def resized_folder(folder, vocab: int):
    """Re-save a tiny model folder with `vocab` embedding rows (room for added special tokens)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        hf.resize_token_embeddings(vocab, mean_resizing=False)
    hf.save_pretrained(folder)
    return folder


def chat_tokenizer():
    """The embedded BPE with SmolLM2-Instruct's arrangement: bos / eos are chat-turn markers named in the template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), unk_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    plain = tiny_model_folder("llama", root / "plain")
    bare = tiny_model_folder("llama", root / "bare")
    for f in bare.glob("tokenizer*"):
        f.unlink()
    chat = resized_folder(tiny_model_folder("llama", root / "chat"), 4098)
    for f in chat.glob("tokenizer*"):
        f.unlink()
    chat_tokenizer().save_pretrained(chat)
    massive = tiny_model_folder("llama", root / "massive")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(massive)
    with torch.no_grad():  # one token's embedding 1000x: its rows carry a massive norm, as attention sinks do
        hf.model.embed_tokens.weight[MASSIVE_ID] *= 1000.0
    hf.save_pretrained(massive)
    return SimpleNamespace(plain=plain, bare=bare, chat=chat, massive=massive, root=root)


@pytest.fixture(scope="module")
def chat_model(folders):
    return load_model(folders.chat, device="cpu")


@pytest.fixture(scope="module")
def bare_model(folders):
    return load_model(folders.bare, device="cpu", tokenizer=False)


# ----------------------------------------------------------------------------------------------- 1. tokenizer optional
def test_a_folder_without_tokenizer_names_the_files_and_how_to_pass_one(folders):
    with pytest.raises(FileNotFoundError) as e:
        load_model(folders.bare, device="cpu")
    msg = str(e.value)
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and str(folders.bare) in msg
    assert "tokenizer=" in msg and "--tokenizer" in msg and "tokenizer=False" in msg
    # a tokenizer from another folder, or none at all
    with_tok = load_model(folders.bare, device="cpu", tokenizer=TOKENIZER_DIR)
    assert with_tok.tokenizer is not None and with_tok.tokenizer("the whale")["input_ids"]
    bare = load_model(folders.bare, device="cpu", tokenizer="none")
    assert bare.tokenizer is None
    with pytest.raises(FileNotFoundError, match="could not be loaded"):
        load_model(folders.bare, device="cpu", tokenizer=str(folders.root / "nowhere"))


def test_without_tokenizer_text_is_a_one_line_error_and_ids_work(bare_model):
    import sae_widgets as sw
    from sae_widgets.feature_stats import token_strings
    from sae_widgets.steering import hook_activations
    from sae_widgets.widgets.prompt_explorer import prompt_latents

    model = bare_model
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="relu", d_in=model.cfg.d_model, d_sae=32, hook=HOOK))
    for call in (lambda: sw.generate(model, None, "the whale", max_new_tokens=2),
                 lambda: sw.diff_in_means(model, HOOK, "a", "b"),
                 lambda: prompt_latents(model, sae, "the whale"),
                 lambda: next(EmbeddedCorpus("val").documents(model.tokenizer))):
        with pytest.raises(ValueError) as e:
            call()
        assert "tokenizer" in str(e.value) and "\n" not in str(e.value)

    # generation from ids: BOS is the config's bos_token_id (0) and greedy tokens are the model's own argmax
    gen = sw.generate(model, None, [5, 6, 7], max_new_tokens=3, temperature=0)
    assert gen.prompt == [5, 6, 7] and gen.prompt_tokens == [0, 5, 6, 7]
    seq = torch.tensor([gen.prompt_tokens])
    for t in gen.new_tokens:
        assert t == int(model(seq)[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
    assert gen.new_str_tokens == [f"#{t}" for t in gen.new_tokens]
    assert sw.generate(model, None, torch.tensor([0, 5, 6, 7]), max_new_tokens=3, temperature=0).new_tokens == \
        gen.new_tokens  # ids that already start with BOS get no second one

    # diff-in-means from ids against a direct mean (BOS row left out)
    a, b = [[5, 6, 7], [8, 9]], torch.tensor([[11, 12, 13]])
    acts = [hook_activations(model, HOOK, torch.tensor([[0, *p]]))[0, 1:].double() for p in a]
    ref_a = torch.cat(acts).mean(0)
    ref_b = hook_activations(model, HOOK, torch.tensor([[0, 11, 12, 13]]))[0, 1:].double().mean(0)
    torch.testing.assert_close(sw.diff_in_means(model, HOOK, a, b, normalize=False).double(), ref_a - ref_b,
                               rtol=1e-5, atol=1e-6)

    # the prompt explorer and the feature statistics show ids as #id
    labels, f = prompt_latents(model, sae, [5, 6, 7])
    assert labels == ["#5", "#6", "#7"] and f.shape == (3, 32)
    assert token_strings(model)[:3] == ["#0", "#1", "#2"] and len(token_strings(model)) == model.cfg.d_vocab
    windows = torch.cat([torch.zeros(6, 1, dtype=torch.long), docs(6, N_CTX - 1)], 1)
    stats = sw.FeatureStats.compute(model, sae, windows, n_top=2, n_quantile_bins=2, per_bin=1, show_progress=False)
    ctx = next(c for i in range(32) for c in stats.feature(i)["top_contexts"])
    assert all(t.startswith("#") for t in ctx["tokens"])
    explorer = sw.PromptExplorer(model, sae, stats, text=torch.tensor([5, 6, 7]))
    assert explorer.tokens == ["#5", "#6", "#7"] and explorer.text == "#5 #6 #7" and explorer.error == ""
    torch.testing.assert_close(explorer.latents(), f)
    explorer.text = "typed text"  # typing replaces the ids; without a tokenizer that is the one-line error
    assert explorer.token_ids == [] and explorer.tokens == [] and "without a tokenizer" in explorer.error

    # steering from ids: the default held-out text needs a tokenizer, so its perplexity is skipped with a warning,
    # and held-out token windows measure it
    edits = [sw.LatentEdit(3, "add", 4.0)]
    with pytest.warns(UserWarning, match="held-out perplexity is skipped"):
        res = sw.steer(model, sae, [5, 6, 7], edits, max_new_tokens=2, temperature=0)
    assert res.prompt == [5, 6, 7] and res.perplexity_baseline is None
    windows = torch.cat([torch.zeros(4, 1, dtype=torch.long), docs(4, N_CTX - 1)], 1)
    res = sw.steer(model, sae, [5, 6, 7], edits, max_new_tokens=2, temperature=0, n_heldout_windows=4,
                   heldout_tokens=windows)
    assert res.heldout_tokens == 4 * (N_CTX - 1) and res.perplexity_steered > 0
    json.dumps(res.to_dict())

    # the steering panel takes ids too, and generates what steer generates from them
    panel = sw.SteeringPanel(model, sae, prompt=[5, 6, 7], max_new_tokens=2, temperature=0.0)
    assert panel.prompt == "#5 #6 #7" and panel.prompt_ids == [5, 6, 7]
    panel.add_latent(3, 4.0, "add")
    run = panel.generate()
    direct = sw.steer(model, sae, [5, 6, 7], edits, max_new_tokens=2, temperature=0, n_samples=1,
                      n_heldout_windows=0)
    assert run["steered"]["tokens"] == direct.steered[0].new_str_tokens
    assert run["baseline"]["tokens"] == direct.baseline[0].new_str_tokens
    panel.prompt = "typed text"  # typing replaces the ids; without a tokenizer generating is the one-line error
    assert panel.prompt_ids == []
    with pytest.raises(ValueError, match="without a tokenizer"):
        panel.generate()


def test_without_tokenizer_the_cli_trains_evaluates_and_the_sae_steers_from_ids(folders, tmp_path):
    """`sae-widgets train --tokenizer none --tokens-file ... --eval-tokens-file ...` on a folder with no tokenizer."""
    import sae_widgets as sw
    from sae_widgets.cli import main

    save_file({"tokens": docs(40, 30, seed=1)}, tmp_path / "train.safetensors")
    save_file({"tokens": docs(20, 30, seed=2)}, tmp_path / "val.safetensors")
    out = tmp_path / "run"
    rc = main(["train", "--model", str(folders.bare), "--tokenizer", "none", "--hook", HOOK, "--d-sae", "64",
               "--k", "4", "--tokens", "1024", "--batch-size", "64", "--buffer-size", "256", "--n-ctx", str(N_CTX),
               "--model-batch-size", "4", "--eval-tokens", "256", "--lr-warmup-steps", "2", "--checkpoint-every",
               "0", "--device", "cpu", "--no-progress", "--tokens-file", str(tmp_path / "train.safetensors"),
               "--eval-tokens-file", str(tmp_path / "val.safetensors"), "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["explained_variance"] > 0 and "ce_loss_without_sae" in metrics["metrics"]
    # without a tokenizer the config's ids are the special tokens: its eos (0) separates the 30-token documents, and
    # those rows are dropped (one per document: 31 tokens per 15-token window body -> about every other window)
    train = metrics["training_row_counts"]
    assert train["rows_kept"] >= 1024 and train["dropped_massive_norm"] == 0
    assert train["dropped_special_tokens"] == pytest.approx((train["rows_kept"] + train["dropped_special_tokens"]) / 31,
                                                            abs=2)
    assert metrics["row_counts"]["dropped_special_tokens"] > 0
    model = load_model(folders.bare, device="cpu", tokenizer=False)
    sae = sw.load_sae(out / "sae")
    gen = sw.generate(model, sae, [5, 6, 7], [sw.LatentEdit(0, "add", 5.0)], max_new_tokens=2, temperature=0)
    assert len(gen.new_tokens) == 2


# ----------------------------------------------------------------------------------------------- 2. BOS, special tokens
def test_a_chat_tokenizer_bos_is_passed_over_for_the_end_of_text_token(chat_model):
    model = chat_model
    tok = model.tokenizer
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and model.cfg.d_vocab == 4098
    rows = ModelRows(model, [HOOK], TokenArray(docs(3, 20)), n_ctx=N_CTX, prepend_bos=True, keep_bos_rows=False,
                     model_batch_size=2, dtype=torch.float32)
    assert rows.bos_id == 0 and rows.sep_id == 0  # <|endoftext|>, not <|im_start|> (4096) / <|im_end|> (4097)
    d = docs(3, 20)
    first, second = next(rows._windows), next(rows._windows)
    assert first == [0, *d[0, :N_CTX - 1].tolist()]
    assert second == [0, *d[0, N_CTX - 1:].tolist(), 0, *d[1, :N_CTX - 1 - 6].tolist()]  # separator 0, not 4097
    from sae_widgets.special_tokens import boundary_tokens, excluded_token_ids

    assert excluded_token_ids(model, rows.boundaries) == [0, 4096, 4097]
    # explicit choices win: a token string or an id
    assert boundary_tokens(model, bos_token="<|im_start|>").bos_id == 4096
    assert boundary_tokens(model, bos_token=7, separator_token="<|im_end|>").describe() == \
        {"bos_id": 7, "separator_id": 4097}
    with pytest.raises(ValueError, match=r"bos_token='<\|nope\|>' is not a token of this tokenizer"):
        boundary_tokens(model, bos_token="<|nope|>")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        boundary_tokens(model, separator_token=5000)


def fake_model(tokenizer, d_vocab: int, **config_ids):
    return SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(d_vocab=d_vocab),
                           original_model=SimpleNamespace(config=SimpleNamespace(**config_ids)))


def test_the_boundary_rule_case_by_case():
    from transformers import PreTrainedTokenizerFast

    from sae_widgets.special_tokens import boundary_tokens

    def tokenizer(bos=None, eos=None, template=None, extra=()):
        tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"))
        tok.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
        if extra:
            tok.add_tokens(list(extra), special_tokens=True)
        tok.chat_template = template
        return tok

    # Llama-3 style: the template writes {{ bos_token }}, so the literal BOS is no marker and stays the BOS
    llama3 = tokenizer("<|begin_of_text|>", "<|eot_id|>", "{{ bos_token }}{% for m in messages %}<|start_header_id|>"
                       "{{ m['content'] }}<|eot_id|>{% endfor %}", extra=("<|start_header_id|>",))
    b = boundary_tokens(fake_model(llama3, 4200))
    assert (b.bos_id, b.separator_id) == (4096, 0)  # separator: eos is a marker, <|endoftext|> is next
    # no template: bos and eos as the tokenizer says
    plain = tokenizer("<|endoftext|>", "<|endoftext|>")
    assert boundary_tokens(fake_model(plain, 4096)).describe() == {"bos_id": 0, "separator_id": 0}
    # every candidate is a marker or outside the vocabulary: none, with a warning each
    markers_only = tokenizer("<|im_start|>", "<|im_end|>", CHAT_TEMPLATE + "<|endoftext|>")
    with pytest.warns(UserWarning) as caught:
        b = boundary_tokens(fake_model(markers_only, 4098))
    assert (b.bos_id, b.separator_id) == (None, None) and len(caught) == 2
    assert "no usable BOS" in str(caught[0].message) and "chat-turn marker" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert boundary_tokens(fake_model(markers_only, 4098), prepend_bos=False, separator_token=0).bos_id is None
    # no tokenizer: the model config's ids
    assert boundary_tokens(fake_model(None, 100, bos_token_id=1, eos_token_id=[2, 3])).describe() == \
        {"bos_id": 1, "separator_id": 2}


def test_special_token_rows_are_dropped_from_training_rows_and_metrics(model):
    """Embedded model, documents shorter than a window: separators (<|endoftext|>, id 0) fall inside windows."""
    d = docs(12, 11)
    rows = ModelRows(model, [HOOK], TokenArray(d), n_ctx=N_CTX, prepend_bos=True, keep_bos_rows=False,
                     model_batch_size=4, dtype=torch.float32)  # the defaults
    windows = torch.tensor(list(_first_windows(rows, 4)))
    acts = run_to_hooks(model, [HOOK], windows)[0]
    body, toks = acts[:, 1:], windows[:, 1:]
    want = body[toks != 0]
    got = rows.next_rows()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    n_sep = int((toks == 0).sum())
    assert n_sep >= 3
    assert rows.counts == {"dropped_special_tokens": n_sep, "dropped_massive_norm": 0, "rows_kept": len(want)}
    kept_all = ModelRows(model, [HOOK], TokenArray(d), n_ctx=N_CTX, prepend_bos=True, keep_bos_rows=False,
                         model_batch_size=4, dtype=torch.float32, exclude_special_tokens=False)
    assert len(kept_all.next_rows()) == body.shape[0] * body.shape[1]
    # metrics: evaluate over the store equals the metrics of the hand-filtered rows, and reports the drops
    torch.manual_seed(0)
    sae = SAE(SAEConfig(arch="topk", d_in=model.cfg.d_model, d_sae=64, k=4, hook=HOOK))
    store = ActivationStore(model, HOOK, TokenArray(d), n_ctx=N_CTX, batch_size=len(want), buffer_size=len(want),
                            model_batch_size=4, shuffle=False, show_progress=False)
    result = evaluate(None, sae, store, n_tokens=len(want))
    with torch.no_grad():
        ref = reconstruction_metrics(want, sae(want)[0])
    for k, v in ref.items():
        assert result.metrics[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert result.row_counts["dropped_special_tokens"] == n_sep
    assert result.to_dict()["row_counts"] == result.row_counts
    assert "dropped" in result.table() and f"{n_sep:,} special-token" in result.table()


def _first_windows(rows: ModelRows, n: int):
    fresh = ModelRows(rows.model, rows.hooks, rows.source, n_ctx=rows.n_ctx, prepend_bos=True, keep_bos_rows=False,
                      model_batch_size=1, dtype=torch.float32)
    return [next(fresh._windows) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- 3. massive norms
def test_row_filter_on_hand_made_activations():
    from sae_widgets.row_filter import RowFilter

    tokens = torch.tensor([[9, 1, 2, 3, 4], [9, 5, 6, 7, 8]])
    norms = torch.tensor([[500.0, 1.0, 2.0, 3.0, 40.0], [600.0, 2.5, 1.5, 2.0, 1.0]])
    acts = torch.zeros(2, 5, 3)
    acts[..., 1] = norms  # one non-zero coordinate: the row norm is exactly `norms`
    # non-BOS norms: 1, 2, 3, 40, 2.5, 1.5, 2, 1 -> lower median 2.0; factor 10 -> drop norms > 20 (the 40)
    f = RowFilter([3], bos_first=True, keep_bos_rows=False, excluded_ids=[6], massive_norm_factor=10)
    keep = f.keep(tokens, acts)
    want = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])
    assert torch.equal(keep, want)
    assert f.counts == {"dropped_special_tokens": 1, "dropped_massive_norm": 1, "rows_kept": 6}
    # keep_bos_rows keeps position 0 whatever its norm; the factor off keeps the 40
    f = RowFilter([3], bos_first=True, keep_bos_rows=True, massive_norm_factor=0)
    assert f.keep(tokens, acts).all()
    # a pair of hooks: a row goes when either hook's norm is massive for that hook
    pair = torch.cat([acts, torch.ones(2, 5, 2)], -1)
    pair[1, 2, 3:] = 100.0
    f = RowFilter([3, 2], bos_first=True, keep_bos_rows=False, massive_norm_factor=10)
    assert f.keep(tokens, pair).tolist() == [[False, True, True, True, False], [False, True, False, True, True]]
    with pytest.raises(ValueError, match=r"massive_norm_factor=0\.5 must be a number > 1"):
        RowFilter([3], bos_first=True, keep_bos_rows=False, massive_norm_factor=0.5)


@pytest.fixture(scope="module")
def massive_model(folders):
    return load_model(folders.massive, device="cpu")


def massive_docs() -> torch.Tensor:
    d = docs(12, 11, seed=4)
    d[::2, 3] = MASSIVE_ID
    d[1::3, 7] = MASSIVE_ID
    return d


def test_massive_norm_rows_are_dropped_and_counted(massive_model):
    model = massive_model
    d = massive_docs()
    rows = ModelRows(model, [HOOK], TokenArray(d), n_ctx=N_CTX, prepend_bos=True, keep_bos_rows=False,
                     model_batch_size=4, dtype=torch.float32)
    windows = torch.tensor(_first_windows(rows, 4))
    acts = run_to_hooks(model, [HOOK], windows)[0]
    norms = acts[:, 1:].norm(dim=-1)
    toks = windows[:, 1:]
    assert norms[toks == MASSIVE_ID].min() > 100 * norms[toks != MASSIVE_ID].max()  # honestly massive
    got = rows.next_rows()
    torch.testing.assert_close(got, acts[:, 1:][(toks != MASSIVE_ID) & (toks != 0)], rtol=0, atol=1e-5)
    assert rows.counts["dropped_massive_norm"] == int((toks == MASSIVE_ID).sum()) > 0
    assert rows.counts["dropped_special_tokens"] == int((toks == 0).sum())


def test_variable_row_counts_keep_cache_resume_and_manifest_exact(massive_model, tmp_path):
    model = massive_model
    kw = dict(n_ctx=N_CTX, model_batch_size=3)
    src = TokenArray(massive_docs())
    cache = write_activation_cache(model, HOOK, tmp_path / "c", n_tokens=600, source=src, shard_tokens=100,
                                   show_progress=False, **kw)
    manifest = read_manifest(cache)
    assert manifest["massive_norm_factor"] == 10.0 and manifest["exclude_token_ids"] == [0]
    assert manifest["bos_id"] == 0 and manifest["counts"]["dropped_massive_norm"] > 0
    live = ActivationStore(model, HOOK, src, batch_size=50, buffer_size=200, seed=1, show_progress=False, **kw)
    cached = ActivationStore.from_cache(cache, batch_size=50, buffer_size=200, seed=1, show_progress=False)
    batches = [live.next_batch() for _ in range(6)]
    for b in batches:
        assert torch.equal(cached.next_batch(), b)
    # resume: a fresh store given the state serves the very next batches and carries the counts on
    live2 = ActivationStore(model, HOOK, src, batch_size=50, buffer_size=200, seed=1, show_progress=False, **kw)
    for _ in range(3):
        live2.next_batch()
    state = live2.state_dict()
    again = ActivationStore(model, HOOK, src, batch_size=50, buffer_size=200, seed=1, show_progress=False, **kw)
    again.load_state_dict(state)
    assert again.counts == live2.counts
    for b in batches[3:]:
        assert torch.equal(again.next_batch(), b)
    # an old manifest (no counts, no filter settings) still reads
    old = json.loads((cache / "manifest.json").read_text())
    for k in ("counts", "massive_norm_factor", "exclude_token_ids", "exclude_special_tokens", "bos_id",
              "separator_id", "manifest_sha256"):
        old.pop(k)
    (cache / "manifest.json").write_text(json.dumps(old))
    assert ActivationStore.from_cache(cache, batch_size=50, buffer_size=200, seed=1).counts == {}


def test_the_embedded_model_drops_no_massive_norm_rows(model):
    store = ActivationStore(model, HOOK.replace("1", "3"), EmbeddedCorpus("train"), n_ctx=128, batch_size=4096,
                            buffer_size=4096 * 4, model_batch_size=32, show_progress=False)
    store.next_batch()
    c = store.counts
    assert c["rows_kept"] >= 4096 * 4 and c["dropped_massive_norm"] == 0
    assert c["dropped_special_tokens"] < 0.005 * c["rows_kept"]  # only document separators


# ----------------------------------------------------------------------------------------------- configs and CLI
def test_run_config_fields_flags_and_old_configs(tmp_path):
    from sae_widgets.cli import build_parser

    args = build_parser().parse_args(["train", "--hook", HOOK, "--bos-token", "0", "--separator-token", "<|im_end|>",
                                      "--exclude-token-ids", "5", "6", "--massive-norm-factor", "0",
                                      "--no-exclude-special-tokens", "--no-prepend-bos", "--tokenizer", "none"])
    given = {k: v for k, v in vars(args).items() if v is not None and k in RunConfig.__dataclass_fields__}
    cfg = RunConfig.from_dict(given)
    assert cfg.bos_token == 0 and cfg.separator_token == "<|im_end|>" and cfg.exclude_token_ids == [5, 6]
    assert cfg.row_options() == dict(prepend_bos=False, bos_token=0, separator_token="<|im_end|>",
                                     exclude_special_tokens=False, exclude_token_ids=[5, 6], massive_norm_factor=0.0)
    with pytest.raises(ValueError, match="massive_norm_factor"):
        RunConfig(hook=HOOK, massive_norm_factor=0.5)
    # a run config written before these fields resumes with the rows it trained on (no filter)
    (tmp_path / "run_config.json").write_text(json.dumps({"hook": HOOK, "d_sae": 64}))
    old = RunConfig.load(tmp_path)
    assert old.exclude_special_tokens is False and old.massive_norm_factor is None and old.prepend_bos is True
    assert RunConfig(hook=HOOK).exclude_special_tokens is True and RunConfig(hook=HOOK).massive_norm_factor == 10.0


def test_cache_cli_takes_token_files_and_the_row_flags(folders, tmp_path, capsys):
    from sae_widgets.cli import main

    save_file({"tokens": massive_docs()}, tmp_path / "t.safetensors")
    rc = main(["cache", "--model", str(folders.massive), "--hook", HOOK, "--tokens", "200", "--out",
               str(tmp_path / "c"), "--n-ctx", str(N_CTX), "--model-batch-size", "3", "--device", "cpu",
               "--tokens-file", str(tmp_path / "t.safetensors"), "--massive-norm-factor", "0",
               "--no-exclude-special-tokens"])
    assert rc == 0
    m = read_manifest(tmp_path / "c")
    assert m["massive_norm_factor"] is None and m["exclude_token_ids"] == [] and m["dataset"]["kind"] == "token_file"
    assert m["counts"]["dropped_massive_norm"] == 0 and "cached rows:" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "c")
