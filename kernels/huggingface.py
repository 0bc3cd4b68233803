"""patch_transformers: tinyfuse's kernels inside a Hugging Face Llama, Mistral, Qwen2 or Qwen3 model.

The patch binds new `forward` methods to the model's own modules: the parameters,
their names and the state dict stay exactly as they were (save_pretrained, an
optimizer built before the patch, tied embeddings all keep working), and only the
patched instance changes. What each part replaces:

- RMSNorm (every one: the layers', the final norm, Qwen3's q/k norms): rms_norm.
- RoPE: the attention's `apply_rotary_pos_emb`, through `rope` with one cos/sin row
  per token, so Hugging Face's position ids (left padding, a KV cache) keep their
  meaning. The attention forward is Hugging Face's own code, run with that one name
  rebound; nothing else in it changes.
- SwiGLU MLP: swiglu. When the input has at least as many rows as the MLP's width,
  gate and up come from one matmul with the two weights stacked and the gradient of
  its [N, 2H] output comes back as one tensor: that saves a read of x forward and a
  read of x plus the add of two input gradients backward (about 5 N*D elements)
  for a copy of the two weights (4 H*D), a gain once N exceeds 0.8 H. Shorter inputs
  (decoding) run the two projections and the activation alone.
- The causal-LM loss: with labels and no logits asked for (training, by default),
  linear_cross_entropy on the final hidden states and the head's weight, never
  holding the [N, V] logits; labels shifted, ignore_index -100 and
  num_items_in_batch ("sum" divided by it) as in Hugging Face's ForCausalLMLoss.
  Pass skip_logits=False to get the logits (the loss is then Hugging Face's).

Where patched and unpatched differ: rms_norm rounds once where Hugging Face rounds
the normalised value before the weight (bf16 results may differ in the last bit),
and the linear_cross_entropy loss comes back in the head's compute dtype (bf16
under bf16 autocast) where Hugging Face upcasts the logits to float32 first.
"""
import importlib
import types

import torch
import torch.nn.functional as F

from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu

# model_type -> the class-name prefix in transformers.models.<type>.modeling_<type>
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
PARTS = ("rms_norm", "rope", "swiglu", "linear_cross_entropy")
_IGNORE_INDEX = -100


def _modeling(model_type):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _unsupported(what):
    return TypeError(f"patch_transformers: supported model families are {', '.join(FAMILIES.values())}; "
                     f"got {what}")


# ---- the forwards bound to the model's modules ----------------------------------------

def _rms_norm_forward(self, hidden_states):
    # Hugging Face returns weight * normalised in the promoted dtype (float32 weights
    # under autocast give a float32 result): keep that.
    dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
    return rms_norm(hidden_states.to(dtype), self.weight.to(dtype), self.variance_epsilon)


def _rotary(original):
    """Hugging Face's apply_rotary_pos_emb through `rope`: q [B, H, T, D], cos/sin
    [B or 1, T, D] whose two halves are equal (the rotate_half convention). Any other
    layout (partial rotary, another unsqueeze_dim) goes to the original function."""
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1 or cos.dim() != 3 or cos.shape[-1] != q.shape[-1] or q.shape[-1] % 2:
            return original(q, k, cos, sin, unsqueeze_dim)
        half = q.shape[-1] // 2
        q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos[..., :half], sin[..., :half],
                            interleaved=False)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    return apply_rotary_pos_emb


def _attention_forward(cls):
    """cls.forward with the name apply_rotary_pos_emb rebound to tinyfuse's rope: the same
    code object, so the attention is exactly Hugging Face's apart from that call."""
    forward = cls.forward
    code = forward.__code__
    if hasattr(forward, "__wrapped__") or forward.__closure__ or "apply_rotary_pos_emb" not in code.co_names:
        raise TypeError(f"patch_transformers: {cls.__name__}.forward in this transformers version does not call "
                        "apply_rotary_pos_emb as a module function; patch with rope=False")
    names = dict(forward.__globals__)
    names["apply_rotary_pos_emb"] = _rotary(forward.__globals__["apply_rotary_pos_emb"])
    patched = types.FunctionType(code, names, forward.__name__, forward.__defaults__)
    patched.__kwdefaults__ = forward.__kwdefaults__
    return patched


def _mlp_forward(self, x):
    gate, up = self.gate_proj, self.up_proj
    rows = x.numel() // max(x.shape[-1], 1)
    if gate.bias is None and up.bias is None and rows >= gate.out_features:
        return self.down_proj(swiglu(F.linear(x, torch.cat((gate.weight, up.weight)))))
    return self.down_proj(swiglu(gate(x), up(x)))


def _causal_lm_loss(hidden, weight, labels, num_items_in_batch=None, ignore_index=_IGNORE_INDEX,
                    shift_labels=None, **_):
    """Hugging Face's ForCausalLMLoss on hidden @ weight.T, without the logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the dtype the head's matmul would run in
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        hidden = hidden.to(weight.dtype)
    target = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        return linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="mean")
    loss = linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, skip_logits=None,
                       **kwargs):
    """The ForCausalLM forward with the loss through linear_cross_entropy. skip_logits
    (default: training with labels) returns loss without logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if skip_logits and labels is None:
        raise ValueError("skip_logits=True needs labels: without them there is nothing to return")
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    hidden = outputs.last_hidden_state
    logits = loss = None
    if skip_logits:
        loss = _causal_lm_loss(hidden, self.lm_head.weight, labels, **kwargs)
    else:
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# ---- planning and applying ------------------------------------------------------------

def _plan(model, parts):
    """[(module, part, forward)] for every module of `model` that a chosen part replaces
    and that is not patched yet; raises before anything changes for an unsupported model."""
    from transformers import PreTrainedModel
    from transformers.utils import can_return_tuple  # return_dict=False handled as Hugging Face does

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in FAMILIES:
        raise _unsupported(f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else ""))
    modeling, prefix = _modeling(model_type), FAMILIES[model_type]
    plan = []
    for module in model.modules():
        done = getattr(module, "_tinyfuse_patched", ())
        if "rms_norm" in parts and isinstance(module, getattr(modeling, f"{prefix}RMSNorm")):
            plan.append((module, "rms_norm", types.MethodType(_rms_norm_forward, module)))
        elif "rope" in parts and isinstance(module, getattr(modeling, f"{prefix}Attention")):
            plan.append((module, "rope", types.MethodType(_attention_forward(type(module)), module)))
        elif "swiglu" in parts and isinstance(module, getattr(modeling, f"{prefix}MLP")):
            if module.config.hidden_act not in ("silu", "swish"):
                raise TypeError(f"patch_transformers: swiglu replaces a SiLU-gated MLP; this model's hidden_act is "
                                f"{module.config.hidden_act!r}: patch with swiglu=False")
            plan.append((module, "swiglu", types.MethodType(_mlp_forward, module)))
        elif "linear_cross_entropy" in parts and isinstance(module, getattr(modeling, f"{prefix}ForCausalLM")):
            if module.lm_head.bias is not None:
                raise TypeError("patch_transformers: linear_cross_entropy takes a head without bias; "
                                "patch with linear_cross_entropy=False")
            plan.append((module, "linear_cross_entropy", types.MethodType(can_return_tuple(_causal_lm_forward), module)))
        else:
            continue
        if plan[-1][1] in done:
            plan.pop()
    return plan


def _patch_classes(parts):
    """Patch every model of the families built from now on: each family's
    PreTrainedModel.post_init (the last step of every model's __init__) patches the
    instance it finishes. Calling again replaces the chosen parts, never stacks."""
    for model_type, prefix in FAMILIES.items():
        try:
            base = getattr(_modeling(model_type), f"{prefix}PreTrainedModel")
        except (ImportError, AttributeError):
            continue  # an older transformers without this family
        original = base.__dict__.get("_tinyfuse_original_post_init", base.post_init)

        def post_init(self, _original=original):
            _original(self)
            patch_transformers(self, **{part: part in parts for part in PARTS})

        base._tinyfuse_original_post_init = original
        base.post_init = post_init


def patch_transformers(model=None, *, rms_norm=True, rope=True, swiglu=True, linear_cross_entropy=True):
    """Run a Hugging Face Llama, Mistral, Qwen2 or Qwen3 model on tinyfuse's kernels.

    With a model instance, patches that instance in place (its weights are kept, not
    copied) and returns it; calling again is harmless. With no instance, patches the
    classes, so every such model built afterwards is patched. Any other model raises
    an error naming the supported families, with nothing changed. See the module
    docstring for what each part replaces.
    """
    chosen = {part for part, on in zip(PARTS, (rms_norm, rope, swiglu, linear_cross_entropy)) if on}
    if model is None:
        _patch_classes(chosen)
        return None
    for module, part, forward in _plan(model, chosen):
        module.forward = forward
        module._tinyfuse_patched = (*getattr(module, "_tinyfuse_patched", ()), part)
    return model
