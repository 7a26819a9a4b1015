"""The one layer runner every stack uses (decoder-only models, BigBird, T5 and LongT5
encoders and decoders): token inputs for masks and the cache, then embedding, a scan over
the stacked layers carrying the cache write, and the final norm.

A model supplies only what differs: how it embeds, what one layer does with its
`LayerStep`, and how it finishes. Scan, loop and remat come from the stack's own
`RunOptions`.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from .. import nn
from ..errors import InputError


class TokenInputs(NamedTuple):
    """What every layer of a stack needs besides its hidden states."""

    positions: Int[Array, " seq"]  # feed the position embeddings / rotary angles
    slots: Int[Array, " seq"]  # the queries' slots, for causal / window masks
    kv_slots: Int[Array, " kv"]  # the keys' slots (the whole cache when decoding)
    kv_valid: Bool[Array, " kv"]  # keys that are real tokens, not padding or empty cache
    cache: nn.KVCache | None  # the cache with these tokens' slots marked, if decoding
    write: nn.LayerWrite | None

    def finish(self, write: nn.LayerWrite | None) -> nn.KVCache | None:
        """The cache after every layer wrote its keys and values."""
        if self.cache is None or write is None:
            return None
        return nn.KVCache(write.keys, write.values, self.cache.valid, self.cache.index)

    @property
    def causal(self) -> bool:
        """Queries and keys are the same slots (no cache), so attention may skip blocks."""
        return self.write is None


def token_inputs(
    input_ids: Int[Array, " seq"],
    attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None,
    position_ids: Int[Array, " seq"] | None,
    cache: nn.KVCache | None,
) -> TokenInputs:
    """Slots, positions and key validity for a forward pass or a cached decode step.

    Default positions are the slots `0..seq-1` (offset by the cache index), as in HF;
    pass explicit `position_ids` for left-padded batches.
    """
    seq = input_ids.shape[0]
    valid = jnp.ones((seq,), bool) if attention_mask is None else attention_mask.astype(bool)
    if cache is None:
        slots = jnp.arange(seq, dtype=jnp.int32)
        positions = slots if position_ids is None else position_ids
        return TokenInputs(positions, slots, slots, valid, None, None)
    if seq > cache.max_len:
        raise InputError(f"{seq} tokens do not fit a KV cache of {cache.max_len} slots")
    slots = cache.slots(seq)
    if _CHECKS_IN_PROGRAM.get():
        slots = eqx.error_if(
            slots, slots[-1] >= cache.max_len, "decode step writes past the end of the KV cache; allocate a longer one"
        )
    positions = slots if position_ids is None else position_ids
    write = nn.LayerWrite(cache.keys, cache.values, cache.index)
    cache = cache.with_tokens(valid)
    kv_slots = jnp.arange(cache.max_len, dtype=jnp.int32)
    return TokenInputs(positions, slots, kv_slots, cache.valid, cache, write)


#: False while tracing under `checked_on_host`. A context variable: a trace in another thread
#: (the server's engine) keeps its checks.
_CHECKS_IN_PROGRAM = contextvars.ContextVar("eqx_models_checks_in_program", default=True)


@contextlib.contextmanager
def checked_on_host() -> Iterator[None]:
    """Leaves the run-time checks of token ids and KV-cache slots (`eqx.error_if`) out of
    the models traced inside the block, for a caller that has checked its ids on the host
    and sized the cache itself (`generate` and `stream` on concrete inputs). Each check is
    a host callback: a round trip per decode step, and a program JAX's persistent
    compilation cache refuses to store.

    Tracing only: the caller must key its compiled program on the choice (a static
    argument), or a program traced without checks could be reused for inputs that need them.
    """
    token = _CHECKS_IN_PROGRAM.set(False)
    try:
        yield
    finally:
        _CHECKS_IN_PROGRAM.reset(token)


def check_token_ids(input_ids: Int[Array, " seq"], vocab_size: int) -> Int[Array, " seq"]:
    """Returns `input_ids`, failing at run time if any id is outside `[0, vocab_size)`
    (unless traced under `checked_on_host`)."""
    if not _CHECKS_IN_PROGRAM.get():
        return input_ids
    bad = jnp.any((input_ids < 0) | (input_ids >= vocab_size))
    return eqx.error_if(input_ids, bad, f"input_ids contain a token id outside [0, {vocab_size})")


def valid_mask(
    input_ids: Int[Array, " seq"], attention_mask: Int[Array, " seq"] | Bool[Array, " seq"] | None
) -> Bool[Array, " seq"]:
    """`attention_mask` as booleans; every token real when it is `None`."""
    return jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)


class LayerStep(NamedTuple):
    """What the runner hands one layer besides its hidden states."""

    index: Int[Array, ""]  # the layer's number, where it writes in the stacked cache
    write: nn.LayerWrite | None  # the cache buffers being written, when decoding
    inputs: Any  # this layer's slice of the runner's `per_layer` inputs (windows, cross K/V)


Layer = Callable[[Any, Float[Array, "seq hidden"], LayerStep, PRNGKeyArray | None], tuple[Any, Any]]


def run_stack(
    stack: nn.Stacked,
    *,
    embed: Callable[[PRNGKeyArray | None], Float[Array, "seq hidden"]],
    layer: Layer,
    finish: Callable[[Float[Array, "seq hidden"], PRNGKeyArray | None], Float[Array, "seq hidden"]],
    key: PRNGKeyArray | None = None,
    write: nn.LayerWrite | None = None,
    per_layer: Any = None,
) -> tuple[Float[Array, "seq hidden"], nn.LayerWrite | None]:
    """`finish(scan(layer, embed(key)))`: the forward pass of any stack.

    **Arguments:**

    - `embed(key)`: the input hidden states (embeddings, their dropout).
    - `layer(block, x, step, key) -> (x, write)`: one layer; `step.write` is the cache write
      to pass on (returned unchanged by layers that keep no cache).
    - `finish(x, key)`: the final norm (and dropout).
    - `key`: dropout randomness, split into one key for `embed`, one per layer, one for
      `finish`; `None` without dropout.
    - `write`: the stacked cache buffers to write, when decoding.
    - `per_layer`: inputs with a leading `layers` axis, handed to each layer as `step.inputs`.

    **Returns:** the final hidden states and the cache write after the last layer.
    """
    embed_key, layers_key, finish_key = nn.split_key(key, 3)
    layer_keys = None if layers_key is None else jax.random.split(layers_key, stack.num_layers)

    recorders = _HIDDEN_STATE_RECORDERS[-1:]

    def step(block, carry, xs):
        x, write = carry
        index, inputs, layer_key = xs
        return layer(block, x, LayerStep(index, write, inputs), layer_key), (x if recorders else None)

    indices = jnp.arange(stack.num_layers, dtype=jnp.int32)
    (x, write), inputs = stack.scan(step, (embed(embed_key), write), (indices, per_layer, layer_keys))
    x = finish(x, finish_key)
    for states in recorders:
        states.append((*(inputs[i] for i in range(stack.num_layers)), x))
    return x, write


_HIDDEN_STATE_RECORDERS: list[list[tuple[Array, ...]]] = []


@contextlib.contextmanager
def recording_hidden_states() -> Iterator[list[tuple[Array, ...]]]:
    """Collects the hidden states of every stack `run_stack` runs inside the block, as HF's
    `output_hidden_states`: for each stack, in the order they run, a tuple of the input of
    every layer (the embeddings first) and the stack's final output.

    Recording happens while tracing: read the list inside the same transformation as the
    model call (e.g. return it from the function you `vmap` or `jit`), never outside it.
    """
    states: list[tuple[Array, ...]] = []
    _HIDDEN_STATE_RECORDERS.append(states)
    try:
        yield states
    finally:
        _HIDDEN_STATE_RECORDERS.remove(states)


def vmap_recording(fn: Callable[..., Any], *args: Any) -> Any:
    """`jax.vmap(fn)(*args)` for a model that maps over inputs itself (multiple choice): the
    hidden states recorded inside `fn` leave the `vmap` as outputs, with its leading axis, and
    reach the enclosing `recording_hidden_states` instead of leaking as tracers."""
    if not _HIDDEN_STATE_RECORDERS:
        return jax.vmap(fn)(*args)

    def recorded(*inner: Any) -> Any:
        with recording_hidden_states() as states:
            result = fn(*inner)
        return result, states

    result, states = jax.vmap(recorded)(*args)
    _HIDDEN_STATE_RECORDERS[-1].extend(states)
    return result


def stack_cross_kv(stack: nn.Stacked, encoded: Float[Array, "src hidden"], valid: Bool[Array, " src"]) -> nn.CrossKV:
    """Every layer's cross-attention keys and values (`layer.cross_kv(encoded)`), stacked."""
    _, (keys, values) = stack.scan(lambda block, carry, _: (carry, block.cross_kv(encoded)), None)
    return nn.CrossKV(keys, values, valid)


def cross_inputs(
    stack: nn.Stacked,
    encoder_hidden_states: Float[Array, "src hidden"] | None,
    encoder_attention_mask: Int[Array, " src"] | Bool[Array, " src"] | None,
) -> nn.CrossKV | None:
    """The cross-attention inputs of a decoder called with `encoder_hidden_states`, or `None`."""
    if encoder_hidden_states is None:
        if encoder_attention_mask is not None:
            raise InputError("encoder_attention_mask was given without encoder_hidden_states")
        return None
    valid = jnp.ones(encoder_hidden_states.shape[:1], bool)
    if encoder_attention_mask is not None:
        valid = encoder_attention_mask.astype(bool)
    return stack_cross_kv(stack, encoder_hidden_states, valid)
