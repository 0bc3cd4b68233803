"""patch_transformers against the unpatched Hugging Face model, family by family.

Each test builds one small random model with `transformers` (2 layers, GQA 4/2
heads of 16, vocabulary 96) and a deep copy of it, patches the copy and compares
in float32: the tolerance is the kernels' float32 bound (1e-5 relative-norm
error), since the math is the same up to float32 rounding. The MLP width (24) is
below the rows of a training batch (2 x 14) and above those of a decoding step,
so both of the patched MLP's paths run. Qwen2, Phi-3 and OLMo 2 get untied embeddings
(Qwen2 q/k/v biases), the others tied ones; Qwen3 and Gemma 3 bring their per-head q/k
RMSNorms, OLMo 2 its post-norms and whole-projection q/k norms; Granite its embedding,
residual, attention and logit multipliers; Gemma 2/3 a final logit soft cap small enough
(0.5, against logits of std ~0.3) that a cap dropped or applied twice shows, and Gemma 3
a sliding layer whose window (8) is shorter than the batch; SmolLM3 a layer without RoPE.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import profile

from helpers import DEVICE, rel_err
from tinyfuse.kernels import patch_transformers

transformers = pytest.importorskip("transformers")

TOL = 1e-5
# Everything a patched training step must run (the batch has more rows than the MLP is
# wide: one fused gate/up matmul, the packed SwiGLU backward).
KERNEL_OPS = ("rms_norm_forward", "rms_norm_backward", "rope", "swiglu_forward", "swiglu_packed_backward",
              "linear_cross_entropy_forward", "linear_cross_entropy_backward")
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    # every multiplier away from 1, so that one applied twice or not at all shows
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"tie_word_embeddings": True, "logits_scaling": 4.0,
                                                        "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                        "attention_multiplier": 0.2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"tie_word_embeddings": True}),
    # Gemma 2's attention soft cap has no SDPA path in transformers: eager attention
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"tie_word_embeddings": True, "final_logit_softcapping": 0.5,
                                                      "query_pre_attn_scalar": 16, "attn_implementation": "eager"}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "tie_word_embeddings": True, "final_logit_softcapping": 0.5, "query_pre_attn_scalar": 16,
        "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"tie_word_embeddings": True, "no_rope_layers": [1, 0]}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {"tie_word_embeddings": False}),
}
# What each family's table (kernels/huggingface.py) promises for its modules, by class name:
# every RMSNorm on rms_norm, every attention on rope, the MLP on its gate's op, the loss fused.
GATE = {family: "geglu" if family.startswith("gemma") else "swiglu" for family in FAMILIES}
B, T, V = 2, 14, 96


def build(family, seed=0):
    config_name, model_name, extra = FAMILIES[family]
    settings = dict(vocab_size=V, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0,
                    attn_implementation="sdpa")
    config = getattr(transformers, config_name)(**{**settings, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(DEVICE)
    with torch.no_grad():  # random norm weights, so that a norm weight that is not applied shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def pair(family):
    plain = build(family)
    patched = patch_transformers(copy.deepcopy(plain))
    return plain, patched


def batch(left_pad=False):
    ids = torch.randint(1, V, (B, T), device=DEVICE)
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    if left_pad:  # the first sequence is 5 tokens shorter, padded on the left
        ids[0, :5] = 0
        mask[0, :5] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def grads(model):
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(plain, patched):
    ref, got = grads(plain), grads(patched)
    assert ref.keys() == got.keys() and len(ref) == len(list(plain.parameters()))
    for name in ref:
        assert rel_err(got[name], ref[name]) < TOL, name


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_match(family):
    plain, patched = pair(family)
    ids, mask, labels = batch()
    assert rel_err(patched(ids).logits, plain(ids).logits) < TOL
    out_plain = plain(ids, labels=labels)
    with profile() as prof:
        out_patched = patched(ids, labels=labels)
        out_patched.loss.backward()
    assert out_patched.logits is None  # training with labels: the logits are never formed
    assert rel_err(out_patched.loss, out_plain.loss) < TOL
    out_plain.loss.backward()
    assert_same_grads(plain, patched)
    ran = {e.name for e in prof.events() if e.name.startswith("tinyfuse::")}
    assert ran == {f"tinyfuse::{op}" for op in KERNEL_OPS}, ran
    promised = {"RMSNorm": ("rms_norm",), "Attention": ("rope",), "MLP": (GATE[family],),
                "ForCausalLM": ("linear_cross_entropy",)}
    for name, module in patched.named_modules():
        kind = next((k for k in promised if type(module).__name__.endswith(k)), None)
        assert getattr(module, "_tinyfuse_patched", None) == promised.get(kind), name or "the model"


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_and_position_ids(family):
    """Left padding: the padded sequence's positions start at 0 after its pads
    (position ids from the mask), so each sequence has its own cos/sin rows."""
    plain, patched = pair(family)
    ids, mask, labels = batch(left_pad=True)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    kwargs = dict(attention_mask=mask, position_ids=positions, labels=labels)
    out_plain, out_patched = plain(ids, **kwargs), patched(ids, skip_logits=False, **kwargs)
    real = mask.bool()
    assert rel_err(out_patched.logits[real], out_plain.logits[real]) < TOL
    loss_plain, loss_patched = plain(ids, **kwargs).loss, patched(ids, **kwargs).loss
    assert rel_err(loss_patched, loss_plain) < TOL
    loss_plain.backward()
    loss_patched.backward()
    assert_same_grads(plain, patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation_with_num_items_in_batch(family):
    """Two micro-batches, each loss a sum divided by the tokens of both (as the
    Trainer passes num_items_in_batch): equal to the unpatched model's."""
    plain, patched = pair(family)
    micro = [batch(left_pad=True), batch()]
    items = sum((labels[:, 1:] != -100).sum() for _, _, labels in micro)
    for model in (plain, patched):
        for ids, mask, labels in micro:
            loss = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=items).loss
            loss.backward()
    assert_same_grads(plain, patched)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_gives_the_same_tokens(family):
    plain, patched = pair(family)
    plain.eval()
    patched.eval()
    ids, mask, _ = batch(left_pad=True)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    # generate() asks for the last position's logits only where the forward's signature names logits_to_keep
    assert patched._supports_logits_to_keep() and plain._supports_logits_to_keep()
    with torch.no_grad():
        assert torch.equal(patched.generate(ids, **settings), plain.generate(ids, **settings))


def test_the_readmes_family_table_names_every_family_served():
    """The README's table has one row per family group; its first column's model types are
    exactly those patch_transformers serves, and each is tested here."""
    import re

    from tinyfuse.kernels.huggingface import FAMILIES as SERVED

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    table = readme[readme.index("| family (`model_type`) |"):].split("\n\n")[0].splitlines()[2:]
    listed = [t for row in table for t in re.findall(r"`(\w+)`", row.split("|")[1])]
    assert sorted(listed) == sorted(SERVED) == sorted(FAMILIES)


def test_optimizer_steps_stay_equal():
    """Parameters after SGD-with-momentum steps, and the loss after AdamW steps. Parameters
    after AdamW are not compared element by element: Adam divides each gradient by its
    own running size, so an element whose gradient is near zero turns a 1e-6 relative
    difference into a step of order lr (seen: 1 element of 1,536 off by 4e-5 after 3
    steps at lr 1e-2), which measures Adam, not the kernels."""
    for make in (lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
                 lambda params: torch.optim.AdamW(params, lr=1e-2)):
        plain, patched = pair("llama")
        optimizers = [make(m.parameters()) for m in (plain, patched)]
        for _ in range(3):
            ids, mask, labels = batch()
            losses = []
            for model, opt in zip((plain, patched), optimizers):
                loss = model(ids, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            assert rel_err(losses[1], losses[0]) < TOL
        if isinstance(optimizers[0], torch.optim.SGD):
            for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
                assert rel_err(q, p) < TOL, name


def test_hidden_states_tuples_and_logits_to_keep():
    plain, patched = pair("mistral")
    ids, _, _ = batch()
    got = patched(ids, output_hidden_states=True, logits_to_keep=1)
    ref = plain(ids, output_hidden_states=True, logits_to_keep=1)
    assert got.logits.shape == (B, 1, V)
    assert rel_err(got.logits, ref.logits) < TOL
    assert len(got.hidden_states) == len(ref.hidden_states)
    for h, r in zip(got.hidden_states, ref.hidden_states):
        assert rel_err(h, r) < TOL
    as_tuple = patched(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].dim() == 0


def test_weights_are_kept_and_a_second_patch_is_harmless():
    plain, patched = pair("qwen3")
    before = {name: p for name, p in patched.named_parameters()}
    forwards = {name: m.forward for name, m in patched.named_modules()}
    assert patch_transformers(patched) is patched
    assert {name: p for name, p in patched.named_parameters()} == before  # the same Parameter objects
    assert {name: m.forward.__func__ for name, m in patched.named_modules() if hasattr(m.forward, "__func__")} == \
        {name: f.__func__ for name, f in forwards.items() if hasattr(f, "__func__")}
    assert patched.model.layers[0].self_attn.q_norm._tinyfuse_patched == ("rms_norm",)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight  # still tied
    ids, _, labels = batch()
    assert rel_err(patched(ids, labels=labels).loss, plain(ids, labels=labels).loss) < TOL


def test_parts_can_be_left_out():
    plain = build("llama")
    patched = patch_transformers(copy.deepcopy(plain), rope=False, linear_cross_entropy=False)
    assert not hasattr(patched.model.layers[0].self_attn, "_tinyfuse_patched")
    assert patched.model.layers[0].mlp._tinyfuse_patched == ("swiglu",)
    ids, _, labels = batch()
    out = patched(ids, labels=labels)
    assert out.logits is not None and rel_err(out.loss, plain(ids, labels=labels).loss) < TOL


def test_unsupported_model_is_refused_untouched():
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    forwards = [m.forward for m in model.modules()]
    with pytest.raises(TypeError, match=r"supported model families are Llama, Mistral, Qwen2, Qwen3, Granite, Gemma, Gemma2, "
                                        r"Gemma3, Phi3, SmolLM3, Olmo2; "
                                        r"got GPT2LMHeadModel \(model_type 'gpt2'\)"):
        patch_transformers(model)
    assert [m.forward for m in model.modules()] == forwards
    with pytest.raises(TypeError, match="got Linear"):
        patch_transformers(torch.nn.Linear(2, 2))


def test_torch_compile_fullgraph_around_the_patched_model():
    from helpers import COMPILE_BACKEND

    plain, patched = pair("llama")
    ids, _, labels = batch()
    compiled = torch.compile(patched, fullgraph=True, backend=COMPILE_BACKEND)
    loss = compiled(ids, labels=labels).loss
    ref = plain(ids, labels=labels).loss
    assert rel_err(loss, ref) < TOL
    loss.backward()
    ref.backward()
    assert_same_grads(plain, patched)


def test_patching_the_classes_patches_models_built_afterwards(tmp_path):
    """In a child process: a class patch lasts for the process."""
    code = f"""
import torch
from tinyfuse.engine.runtime import select_backend
select_backend()
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_patch_transformers import build, batch, rel_err, TOL
plain = build("qwen2")
from tinyfuse.kernels import patch_transformers
patch_transformers(swiglu=False)
patch_transformers(swiglu=False)  # twice: no stacking
patched = build("qwen2")
patched.load_state_dict(plain.state_dict())
assert patched.model.norm._tinyfuse_patched == ("rms_norm",)
assert not hasattr(patched.model.layers[0].mlp, "_tinyfuse_patched")
assert patched._tinyfuse_patched == ("linear_cross_entropy",)
ids, _, labels = batch()
assert rel_err(patched(ids, labels=labels).loss, plain(ids, labels=labels).loss) < TOL
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_class_patching_serves_gemma3s_multimodal_model_its_text_part(tmp_path):
    """Gemma 3's multimodal model shares the text model's base class: after a class patch it
    builds, its language model is patched, and its loss (not a ForCausalLM's) stays Hugging Face's."""
    code = """
import torch
from tinyfuse.engine.runtime import select_backend
select_backend()
import transformers
from tinyfuse.kernels import patch_transformers
patch_transformers()
text = dict(vocab_size=96, hidden_size=64, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
model = transformers.Gemma3ForConditionalGeneration(
    transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
layer = model.model.language_model.layers[0]
assert layer.mlp._tinyfuse_patched == ("geglu",) and layer.self_attn.q_norm._tinyfuse_patched == ("rms_norm",)
assert not hasattr(model, "_tinyfuse_patched")
ids = torch.randint(1, 90, (2, 9))
# token_type_ids: the oldest transformers supported asks for them in training
assert torch.isfinite(model(input_ids=ids, labels=ids, token_type_ids=torch.zeros_like(ids)).loss)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("family", ["llama", "gemma", "olmo2"])
def test_a_norm_returns_hugging_faces_dtype(family):
    """bf16 activations, float32 weights: Llama's norm returns float32 (the weight times the
    rounded normalised value), Gemma's and OLMo 2's bf16 (the product rounded); the values
    agree within bf16's bound."""
    from helpers import TOLERANCE

    plain, patched = pair(family)
    x = torch.randn(B, T, 64, device=DEVICE).to(torch.bfloat16)
    ref, got = plain.model.norm(x), patched.model.norm(x)
    assert got.dtype == ref.dtype == (torch.float32 if family == "llama" else torch.bfloat16)
    assert rel_err(got, ref) < TOLERANCE[torch.bfloat16]


def test_an_instance_patch_leaves_other_models_untouched():
    """The RoPE stand-in sits in the modeling module for every model of the family; an
    unpatched model still runs Hugging Face's own code, bit for bit."""
    plain = build("llama")
    ids, _, labels = batch()
    with torch.no_grad():
        before = plain(ids, labels=labels)
    patch_transformers(copy.deepcopy(plain))
    with torch.no_grad(), profile() as prof:
        after = plain(ids, labels=labels)
    assert not [e.name for e in prof.events() if e.name.startswith("tinyfuse::")]
    assert torch.equal(after.logits, before.logits) and torch.equal(after.loss, before.loss)


def test_shift_labels_and_the_cache_keyword():
    """Labels already shifted (shift_labels) give Hugging Face's loss; decoding with the
    cache object under whichever keyword this transformers takes gives the same logits."""
    import inspect

    plain, patched = pair("qwen2")
    ids, _, labels = batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    ref = plain(ids, labels=labels, shift_labels=shifted).loss
    got = patched(ids, labels=labels, shift_labels=shifted).loss
    assert rel_err(got, ref) < TOL
    keyword = "cache" if "cache" in inspect.signature(type(plain.model).forward).parameters else "past_key_values"
    plain.eval()
    patched.eval()
    with torch.no_grad():
        logits = []
        for model in (plain, patched):
            first = model(ids[:, :-1], use_cache=True)
            cache = getattr(first, "past_key_values", None)
            logits.append(model(ids[:, -1:], use_cache=True, **{keyword: cache}).logits)
    assert rel_err(logits[1], logits[0]) < TOL


def test_class_patching_leaves_a_gelu_mlp_to_hugging_face_with_one_warning(tmp_path):
    """transformers' own model tests build GELU Llamas after a class patch: they build and
    run, the MLP left to Hugging Face's code (one warning), the rest patched. On an
    instance, swiglu=True (asked for explicitly) refuses the same model."""
    code = """
import warnings
import torch
from tinyfuse.engine.runtime import select_backend
select_backend()
import transformers
from tinyfuse.kernels import patch_transformers
patch_transformers()
config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=24, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = transformers.LlamaForCausalLM(config)
    transformers.LlamaForCausalLM(config)  # a second model: no second warning
said = [str(w.message) for w in caught if "patch_transformers" in str(w.message)]
assert said == ["patch_transformers: swiglu left to Hugging Face's code in LlamaMLP: swiglu and geglu replace SiLU- "
                "and tanh-GELU-gated MLPs; this one's hidden_act is 'gelu'"], said
assert not hasattr(model.model.layers[0].mlp, "_tinyfuse_patched")
assert model.model.norm._tinyfuse_patched == ("rms_norm",)
ids = torch.randint(0, 96, (2, 9))
loss = model(ids, labels=ids).loss
loss.backward()
assert torch.isfinite(loss)
try:
    patch_transformers(transformers.LlamaForCausalLM(config), swiglu=True)
except TypeError as e:
    assert "hidden_act is 'gelu': patch with swiglu=False" in str(e), e
else:
    raise AssertionError("swiglu=True on a GELU model did not raise")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_the_kernels_package_path(tmp_path):
    """kernels.kernelize with tinyfuse's mapping (this install's classes, no download)
    puts tinyfuse's RMSNorm and RoPE into a model: same loss and gradients, and the
    profiler sees them run. In a child process (kernelizing the RoPE function reaches
    every model of the family) started outside the checkout (whose kernels/ folder would
    shadow the `kernels` package)."""
    code = f"""
import torch
from tinyfuse.engine.runtime import select_backend
select_backend()
import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})
from torch.profiler import profile
import importlib.metadata
try:
    from kernels import Mode, kernelize, use_kernel_mapping
except ImportError:
    print("skip: the kernels package is not installed")
    raise SystemExit
import transformers
from transformers.utils.import_utils import is_kernels_available
if not is_kernels_available():
    print(f"skip: transformers {{transformers.__version__}} does not take kernels "
          f"{{importlib.metadata.version('kernels')}} (its declared range; no release of that range reachable)")
    raise SystemExit
from test_patch_transformers import build, batch, rel_err, assert_same_grads, TOL
from tinyfuse.kernels.huggingface import kernel_mapping
ids, _, labels = batch()
plain = build("llama")
ref = plain(ids, labels=labels).loss  # before kernelize: the RoPE function it replaces is the family's one object
ref.backward()
model = build("llama")  # the same weights; not a deepcopy, whose copied function kernelize would replace instead
with use_kernel_mapping(kernel_mapping(), inherit_mapping=False):
    kernelize(model, mode=Mode.TRAINING, device={DEVICE!r})
with profile() as prof:
    loss = model(ids, labels=labels).loss
    loss.backward()
ran = {{e.name for e in prof.events() if e.name.startswith("tinyfuse::")}}
assert {{"tinyfuse::rms_norm_forward", "tinyfuse::rms_norm_backward", "tinyfuse::rope"}} <= ran, ran
assert rel_err(loss, ref) < TOL
assert_same_grads(plain, model)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if result.stdout.startswith("skip: "):
        pytest.skip(result.stdout.strip().removeprefix("skip: "))
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
