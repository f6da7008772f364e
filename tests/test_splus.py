"""CustomContrast's S+ text condition (customjax.pipeline.encode_splus, seed 000 Eqs. 3, 5): l tokens
through the frozen text encoder(s) in one batched pass; each token stands in the placeholder's place. A
token equal to the placeholder word's own embedding gives the plain text condition; the states before
the placeholder are the same for every token (the encoder is causal)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from customjax.pipeline import encode_splus, encode_text
from customjax.tokenizer import tokenize
from customjax.zoo import random_pipeline


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    return random_pipeline(request.param, "tiny", seed=0, std=0.1)


def _inputs(pipe):
    p, params = pipe
    prompt = "a photo of a toy on the beach"
    ids = tuple(jnp.asarray(tokenize(t, [prompt, prompt.replace("photo", "picture")])) for t in p.tokenizers)
    first = np.asarray(ids[0])
    pos = 5                                                        # a token inside the prompt, before its end
    where = jnp.asarray(np.arange(first.shape[1])[None] == pos).repeat(2, 0)
    own = jnp.concatenate([params["text_encoders"][i]["text_model"]["embeddings"]["token_embedding"]["embedding"]
                           [ids[i][:, pos]] for i in range(len(ids))], -1)      # (B, D_in): the word's own embedding
    return p, params, ids, where, own, pos


def test_the_words_own_embedding_gives_the_plain_condition(pipe):
    p, params, ids, where, own, _ = _inputs(pipe)
    plain, pooled = encode_text(p, params["text_encoders"], ids)
    ctx, pooled_l = jax.jit(lambda t: encode_splus(p, params["text_encoders"], ids, where, t))(
        jnp.repeat(own[:, None], 3, axis=1))
    assert ctx.shape == (2, 3, *plain.shape[1:])
    for a in range(3):
        np.testing.assert_allclose(ctx[:, a], plain, atol=1e-5)
        if pooled is not None:
            np.testing.assert_allclose(pooled_l[:, a], pooled, atol=1e-5)


def test_each_layer_token_changes_only_what_follows_the_placeholder(pipe):
    p, params, ids, where, own, pos = _inputs(pipe)
    tokens = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, own.shape[-1])), jnp.float32)
    ctx, _ = encode_splus(p, params["text_encoders"], ids, where, tokens)
    ctx = np.asarray(ctx)
    for a in range(1, 4):
        np.testing.assert_allclose(ctx[:, a, :pos], ctx[:, 0, :pos], atol=1e-6)       # causal: the prefix is shared
        assert np.abs(ctx[:, a, pos:] - ctx[:, 0, pos:]).max() > 1e-3              # each layer's own token
    with pytest.raises(ValueError, match="input widths sum to"):
        encode_splus(p, params["text_encoders"], ids, where, tokens[..., :-1])


def test_the_objective_reads_a_per_layer_text_condition():
    """Condition.text (L, B, 77, D) replaces the caption's context layer by layer: the caption's own
    context in every layer is the plain loss; another context in one layer changes it; an example whose
    text is dropped gets the empty prompt's context in every layer."""
    import dataclasses

    import train_probe

    from customjax.methods.objective import ObjectiveConfig, loss_fn

    built, frozen, train, batch = train_probe.objective_inputs()
    L = built.unet.config.num_cross_layers
    base_method = built.method

    class PerLayer(type(base_method)):
        def __init__(self):
            self.__dict__.update(base_method.__dict__)

        def condition(self, modules, fr, tr, batch, x, key, cfg):
            cond = super().condition(modules, fr, tr, batch, x, key, cfg)
            return dataclasses.replace(cond, text=jnp.repeat(x.ctx[None], L, axis=0) + batch["delta"])

    def loss_fn_of(per_layer, cfg):
        m = PerLayer() if per_layer else built.method
        return jax.jit(lambda b: loss_fn(train, frozen, b, jax.random.key(3), built=dataclasses.replace(built, method=m),
                                         cfg=cfg)[0])

    ctx_shape = (L, 4, 77, built.unet.config.cross_attention_dim[0])
    zero, last = np.zeros(ctx_shape, np.float32), np.zeros(ctx_shape, np.float32)
    last[-1] = 1.0
    plain = float(loss_fn_of(False, ObjectiveConfig(0.0, 0.0, 0.0))(batch))
    per_layer = loss_fn_of(True, ObjectiveConfig(0.0, 0.0, 0.0))
    assert float(per_layer({**batch, "delta": zero})) == pytest.approx(plain, rel=1e-5)
    assert abs(float(per_layer({**batch, "delta": last})) - plain) > 1e-5
    dropped = loss_fn_of(True, ObjectiveConfig(1.0, 0.0, 0.0))   # every example's text dropped: the edit is ignored
    assert float(dropped({**batch, "delta": last + 1.0})) == pytest.approx(float(dropped({**batch, "delta": zero})),
                                                                          rel=1e-6)
