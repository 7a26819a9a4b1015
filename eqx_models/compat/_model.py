"""The one base of every drop-in class: HF's `FlaxPreTrainedModel` interface over an
Equinox model of ours.

A drop-in class is declared by the model class it wraps (`model_class`, from the registry)
and HF's positional order of its `__call__` arguments; everything else is here, once:

- `from_pretrained` / `__init__(config, seed=...)` / `save_pretrained` (msgpack HF's Flax
  classes load);
- `params`: HF's Flax params dict, built from the Equinox tree on access
  (`checkpoint.layout.tree_to_flax`); setting it (or passing `params=` to a call) puts the
  values into the tree with `tree_from_flax`, inside whatever `jit`/`grad` is tracing;
- `__call__` on batches (our modules take one example; the batch is `vmap`ped), with
  dropout through `dropout_rng` and `train=True`, and HF's output classes;
- `generate`, on `eqx_models.generate`, with HF Flax's `max_length` rules and output shape.

Seq2seq classes (`FlaxSeq2SeqModel`) add `encode` and `decode`.
"""

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import hub
from ..checkpoint import KeyMap, encode_flax_msgpack
from ..checkpoint.layout import tree_from_flax, tree_to_flax
from ..errors import InputError
from ..files import atomic_folder, write_text_atomically
from ..generation import GenerateOutput
from ..generation import generate as eqx_generate
from ..models import CausalLM, EncoderDecoder, Family, Model, Seq2SeqLM, recording_hidden_states
from ..pretrained import CONFIG_NAME, load_state, load_with_report, model_dtype, read_config, resolve_dtype
from ..validation import show_value
from . import _outputs as out
from ._config import Config, GenerationConfig, model_config

FLAX_WEIGHTS_NAME = "flax_model.msgpack"
_ARRAYS = (jax.Array, np.ndarray, np.generic)
GENERATION_CONFIG_NAME = "generation_config.json"

#: HF's output class of each task (base models: see `_base_output`).
TASK_OUTPUTS: dict[str, type[out.ModelOutput]] = {
    "causal_lm": out.FlaxCausalLMOutput,
    "masked_lm": out.FlaxMaskedLMOutput,
    "pretraining": out.FlaxBigBirdForPreTrainingOutput,
    "sequence_classification": out.FlaxSequenceClassifierOutput,
    "multiple_choice": out.FlaxMultipleChoiceModelOutput,
    "token_classification": out.FlaxTokenClassifierOutput,
    "question_answering": out.FlaxBigBirdForQuestionAnsweringModelOutput,
    "seq2seq_lm": out.FlaxSeq2SeqLMOutput,
}

#: Keyword arguments of HF's `from_pretrained` that only steer downloads or HF internals.
_CONTROL = ("output_attentions", "output_hidden_states", "return_dict", "train", "params", "dropout_rng")


def _config_dict(config: Any) -> dict[str, Any]:
    """A config given as ours (`Config`), a dict, or anything with `to_dict()` (transformers')."""
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(type(config), "to_dict", None)
    if to_dict is None:
        raise InputError(f"config must be a dict or a config object with to_dict(), got {type(config).__name__}")
    return dict(to_dict(config))


def _ids(value: Any, name: str) -> Any:
    """An integer input as int32 (HF casts with `jnp.array(x, dtype="i4")`)."""
    if not isinstance(value, _ARRAYS):
        value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer) and not jnp.issubdtype(value.dtype, jnp.bool_):
        raise InputError(f"{name} must hold integers, got dtype {value.dtype}")
    return jnp.asarray(value).astype(jnp.int32)


class FlaxPreTrainedModel:
    """HF's `FlaxPreTrainedModel` over an eqx_models model (the `eqx_model` attribute).

    Subclasses declare `model_class` (ours), `family` and `call_arguments` (HF's
    positional order of `__call__`'s arguments); `eqx_models.compat` derives one per
    registered class, named `"Flax" + model_class.__name__`.
    """

    model_class: ClassVar[type[Model]]
    family: ClassVar[Family]
    call_arguments: ClassVar[tuple[str, ...]]
    main_input_name: ClassVar[str] = "input_ids"

    def __init__(
        self,
        config: Any,
        input_shape: tuple[int, ...] = (1, 1),
        seed: int = 0,
        dtype: Any = jnp.float32,
        _do_init: bool = True,
        **kwargs: Any,
    ):
        """A randomly initialised model from a config (ours, a dict or transformers'),
        as `FlaxGPTNeoForCausalLM(config, seed=0)`; weights drawn by our initialisers."""
        hf = _config_dict(config)
        hf.setdefault("model_type", self.family.model_type)
        ours = self.family.config.from_hf_config(hf)
        model = self.model_class(ours, dtype=resolve_dtype(dtype), key=jax.random.key(seed), **kwargs)
        self._setup(eqx.nn.inference_mode(model), hf, None)

    @classmethod
    def _wrap(cls, model: Model, hf: dict[str, Any], generation: GenerationConfig | None) -> "FlaxPreTrainedModel":
        self = cls.__new__(cls)
        self._setup(model, hf, generation)
        return self

    def _setup(self, model: Model, hf: dict[str, Any], generation: GenerationConfig | None) -> None:
        if type(model) is not self.model_class:
            raise InputError(f"{type(self).__name__} wraps a {self.model_class.__name__}, got {type(model).__name__}")
        self._model = model
        self._key_map: KeyMap = self.model_class.key_map(model.config)
        values = {**hf, **model.config.to_hf_config()}
        values.pop("eqx_models", None)
        self._config = model_config(values, is_encoder_decoder=isinstance(model, EncoderDecoder))
        if generation is None and self.can_generate():
            generation = GenerationConfig.from_model_config(self._config.to_dict())
        self.generation_config = generation

    # ------------------------------------------------------------------ attributes

    @classmethod
    def can_generate(cls) -> bool:
        return issubclass(cls.model_class, CausalLM | Seq2SeqLM)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def eqx_model(self) -> Model:
        """The Equinox model itself (inference mode), for the native API."""
        return self._model

    @property
    def dtype(self) -> Any:
        return jnp.dtype(model_dtype(self._model))

    @property
    def framework(self) -> str:
        return "flax"

    @property
    def params(self) -> dict[str, Any]:
        """HF's Flax params: a nested dict of HF's structure, names, shapes and values."""
        return tree_to_flax(self._model, self._key_map)

    @params.setter
    def params(self, params: Mapping[str, Any]) -> None:
        self._model = tree_from_flax(self._model, params, self._key_map)

    def _module(self, params: Mapping[str, Any] | None, train: bool) -> Model:
        """Our model with `params` (HF's layout) in place, in training or inference mode."""
        model = self._model if not params else tree_from_flax(self._model, params, self._key_map)
        return eqx.nn.inference_mode(model, value=not train)

    def to_bf16(self, params: Mapping[str, Any], mask: Any = None) -> Any:
        return _cast_floating(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Mapping[str, Any], mask: Any = None) -> Any:
        return _cast_floating(params, jnp.float16, mask)

    def to_fp32(self, params: Mapping[str, Any], mask: Any = None) -> Any:
        return _cast_floating(params, jnp.float32, mask)

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: Any = jnp.float32,
        *model_args: Any,
        config: Any = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str | None = "main",
        from_pt: bool = False,
        ignore_mismatched_sizes: bool = False,
        _do_init: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Loads any checkpoint folder or hub id `eqx_models.from_pretrained` reads
        (safetensors, `pytorch_model.bin`, `flax_model.msgpack`, sharded or not, or our own
        format) as this class; `from_pt` is accepted and not needed. `config` overrides the
        folder's `config.json`. `cache_dir`, `force_download`, `local_files_only`, `token`
        and `revision` act on hub downloads as in HF (`token=False`: no token). With
        `_do_init=False`, returns `(model, params)` as HF does."""
        token = kwargs.pop("use_auth_token", token)
        kwargs.pop("trust_remote_code", None)  # a checkpoint never runs code here, whatever this says
        if kwargs.pop("subfolder", "") not in ("", None):
            raise InputError("subfolder= is not supported: pass the subfolder's own path or repository")
        if model_args or kwargs:
            raise InputError(f"{cls.__name__}.from_pretrained got unsupported arguments {sorted(kwargs) or model_args}")
        if ignore_mismatched_sizes:
            raise InputError("ignore_mismatched_sizes=True is not supported: shapes must match the config")
        env = hub.settings()
        env = dataclasses.replace(
            env,
            cache=Path(cache_dir).expanduser() if cache_dir is not None else env.cache,
            offline=env.offline or local_files_only,
            token=token if isinstance(token, str | bool) else env.token,
            force_download=force_download,
        )
        # HF's default revision is "main"; for a local folder that means "no revision".
        revision = None if revision == "main" else revision
        folder = hub.folder(pretrained_model_name_or_path, revision=revision, env=env)
        architecture = cls.model_class.__name__
        if config is None:
            hf = read_config(folder)
            model, _ = load_with_report(folder, dtype=dtype, architecture=architecture)
        else:
            from ..checkpoint.readers import lazy_state_dict

            hf = _config_dict(config)
            hf.setdefault("model_type", cls.family.model_type)

            def state_of(model_cls: type[Model], cfg: Any, skeleton: Any) -> tuple[Any, KeyMap, str]:
                state, layout = lazy_state_dict(folder)
                return state, model_cls.key_map(cfg), layout

            model, _ = load_state(
                hf,
                state_of,
                label=str(folder),
                dtype=dtype,
                architecture=architecture,
            )
        generation = None
        if cls.can_generate() and (folder / GENERATION_CONFIG_NAME).is_file():
            generation = GenerationConfig.from_dict(read_config(folder, name=GENERATION_CONFIG_NAME))
        self = cls._wrap(model, hf, generation)
        return (self, self.params) if not _do_init else self

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        params: Mapping[str, Any] | None = None,
        push_to_hub: bool = False,
        max_shard_size: Any = "10GB",
        token: Any = None,
        safe_serialization: bool = False,
        **kwargs: Any,
    ) -> None:
        """Writes `config.json`, `flax_model.msgpack` (flax's format: HF's Flax classes and
        `from_pretrained` load it) and, for generating classes, `generation_config.json`.

        A new or empty folder is written atomically (`eqx_models.files.atomic_folder`); as
        HF, a folder that already holds files (a tokenizer, an earlier save) is written
        into, each of these files replaced atomically."""
        if push_to_hub:
            raise InputError("push_to_hub=True: eqx_models does not upload; save to a folder and upload it yourself")
        if safe_serialization:
            raise InputError("safe_serialization=True is not supported here; the Flax msgpack format is written")
        params = self.params if params is None else tree_to_flax(self._module(params, False), self._key_map)
        files: dict[str, str | bytes] = {CONFIG_NAME: self._config_json(params), FLAX_WEIGHTS_NAME: b""}
        if self.generation_config is not None:
            files[GENERATION_CONFIG_NAME] = self.generation_config.to_json_string()
        files[FLAX_WEIGHTS_NAME] = encode_flax_msgpack(params)
        folder = Path(save_directory)
        if folder.is_file():
            raise InputError(f"{folder} is a file; save_pretrained needs a folder")
        if folder.is_dir() and any(folder.iterdir()):
            for name, data in files.items():
                write_text_atomically(folder / name, data)
            return
        with atomic_folder(folder, overwrite=False) as tmp:
            for name, data in files.items():
                write_text_atomically(tmp / name, data)

    def _config_json(self, params: Mapping[str, Any]) -> str:
        config = self._config.to_dict()
        config.pop("use_return_dict", None)  # a property of HF's config, not a setting
        config["architectures"] = [self.model_class.__name__]
        leaves = [leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)]
        config["dtype"] = config["torch_dtype"] = jnp.dtype(leaves[0].dtype).name if leaves else "float32"
        return Config(config).to_json_string()

    # ------------------------------------------------------------------ calling

    def _bind(self, names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """HF's arguments by name: positional ones in HF's order, then keywords."""
        if len(args) > len(names):
            raise InputError(f"{type(self).__name__} takes at most {len(names)} positional arguments, got {len(args)}")
        bound = dict(zip(names, args))
        twice = sorted(set(bound) & set(kwargs))
        unknown = sorted(set(kwargs) - set(names))
        if twice or unknown:
            problem = f"got {twice} twice" if twice else f"got unexpected arguments {unknown}"
            raise InputError(f"{type(self).__name__}: {problem}; it takes {', '.join(names)}")
        return {**dict.fromkeys(names), **bound, **kwargs}

    def _control(self, a: dict[str, Any]) -> tuple[bool, bool, Any]:
        """`(output_hidden_states, return_dict, dropout key)` from the call's arguments."""
        if a.get("output_attentions") or (a.get("output_attentions") is None and self._config.output_attentions):
            raise InputError("output_attentions=True is not supported: eqx_models does not keep attention weights")
        if a.get("past_key_values") is not None:
            raise InputError("past_key_values is not supported: generate() keeps its own cache")
        if a.get("head_mask") is not None:
            raise InputError("head_mask is not supported (HF's Flax BigBird ignored it with block-sparse attention)")
        hidden = self._config.output_hidden_states if a["output_hidden_states"] is None else a["output_hidden_states"]
        return_dict = self._config.return_dict if a["return_dict"] is None else a["return_dict"]
        key = None
        if a["train"]:
            if a["dropout_rng"] is None:
                raise InputError("train=True applies dropout and needs dropout_rng=jax.random.PRNGKey(...)")
            key = a["dropout_rng"]
        return bool(hidden), bool(return_dict), key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """HF's `__call__` of this class: batched inputs (`input_ids [batch, seq]`, ...),
        `params=`, `dropout_rng=` with `train=True`, `output_hidden_states`, `return_dict`."""
        a = self._bind(self.call_arguments, args, kwargs)
        inputs = {
            name: a[name]
            for name in self.call_arguments
            if name not in _CONTROL + ("past_key_values", "head_mask", "indices_rng") and a[name] is not None
        }
        if "input_ids" not in inputs:
            raise InputError("input_ids is required")
        return self._run(type(self).forward, a, inputs)

    def _run(self, run: Any, a: dict[str, Any], inputs: dict[str, Any]) -> Any:
        """`run(model, inputs, key, hidden)` compiled, on our model with `params` in place."""
        hidden, return_dict, key = self._control(a)
        inputs = {name: value if isinstance(value, _ARRAYS) else np.asarray(value) for name, value in inputs.items()}
        outputs = _apply(run, self._model, a["params"] or None, self._key_map, bool(a["train"]), inputs, key, hidden)
        return outputs if return_dict else outputs.to_tuple()

    @staticmethod
    def forward(model: Model, inputs: dict[str, Any], key: Any, hidden: bool) -> out.ModelOutput:
        """One batched forward pass of an encoder, decoder-only model or head."""
        arrays = {name: FlaxPreTrainedModel._input(name, value) for name, value in inputs.items()}
        length = arrays["input_ids"].shape[-1]

        def one(arrays, key):
            with recording_hidden_states() as states:
                result = model(**arrays, key=key)
            return result, states if hidden else []

        result, states = _batched(one, arrays, key)
        names = type(model).outputs
        values = [result] if len(names) == 1 and not isinstance(result, tuple) else [getattr(result, n) for n in names]
        fields = dict(zip(names, values))
        if hidden:  # HF's [batch, seq, hidden]; multiple choice flattens choices into the batch
            fields["hidden_states"] = tuple(s.reshape(-1, *s.shape[-2:])[:, :length] for s in states[0])
        return _base_output(model)(**fields)

    @staticmethod
    def _input(name: str, value: Any) -> Any:
        if name == "encoder_hidden_states":
            return jnp.asarray(value)
        array = _ids(value, name)
        return array.reshape(array.shape[0]) if name == "question_lengths" else array

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        input_ids: Any,
        generation_config: Any = None,
        prng_key: Any = None,
        trace: bool = True,
        params: Mapping[str, Any] | None = None,
        logits_processor: Any = None,
        **kwargs: Any,
    ) -> out.ModelOutput:
        """HF Flax's `generate`: options from `generation_config` (default
        `model.generation_config`) updated by `kwargs`; `attention_mask` as a keyword.
        Returns `FlaxGreedySearchOutput` / `FlaxSampleOutput` / `FlaxBeamSearchOutput` whose
        `sequences` are `[batch * num_return_sequences, max_length]`, padded with the pad
        id after each row's end. Works under `jax.jit` (`input_ids` traced)."""
        if not self.can_generate():
            raise InputError(
                f"{type(self).__name__} cannot generate: use a ...ForCausalLM or ...ForConditionalGeneration class"
            )
        if logits_processor:
            raise InputError("custom Flax logits processors are not supported; use eqx_models.generate's instead")
        config = copy.deepcopy(self.generation_config) if generation_config is None else generation_config
        config = GenerationConfig.coerce(config)
        model_kwargs = config.update(**kwargs)
        attention_mask = model_kwargs.pop("attention_mask", None)
        if model_kwargs:
            unknown = sorted(model_kwargs)
            raise InputError(f"generate got arguments that are neither generation options nor inputs: {unknown}")
        model = self._module(params, False)
        seq2seq = isinstance(model, EncoderDecoder)
        if input_ids is None or getattr(input_ids, "ndim", None) != 2:
            raise InputError(f"input_ids must be [batch, seq], got {show_value(input_ids)}")
        prompt = 1 if seq2seq else input_ids.shape[-1]
        max_length = _max_length(config, kwargs, prompt, self._config)
        if max_length <= prompt:
            raise InputError(f"max_length={max_length} leaves no room after the {prompt}-token prompt")
        eos = config.eos_token_id
        pad = config.pad_token_id
        if pad is None and eos is not None:
            pad = eos[0] if isinstance(eos, list | tuple) else eos
        beam = config.num_beams > 1
        options = _search_options(config, max_length - prompt, eos, pad)
        key = None
        if config.do_sample:
            key = prng_key if prng_key is not None else jax.random.PRNGKey(0)
        result = eqx_generate(model, input_ids, attention_mask, key=key, output_scores=beam, **options)
        sequences = result.sequences if isinstance(result, GenerateOutput) else result
        sequences = _hf_padding(sequences, prompt, max_length, eos, 0 if pad is None else pad)
        if beam:
            return out.FlaxBeamSearchOutput(sequences=sequences, scores=result.sequences_scores)
        return (out.FlaxSampleOutput if config.do_sample else out.FlaxGreedySearchOutput)(sequences=sequences)


class FlaxSeq2SeqModel(FlaxPreTrainedModel):
    """An encoder-decoder drop-in: `__call__(input_ids, attention_mask, decoder_input_ids,
    decoder_attention_mask, ...)`, `encode(...)` and `decode(decoder_input_ids,
    encoder_outputs, ...)` as HF's Flax T5 family."""

    encode_arguments: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", *_CONTROL[:3], "train", *_CONTROL[4:])
    decode_arguments: ClassVar[tuple[str, ...]] = (
        "decoder_input_ids",
        "encoder_outputs",
        "encoder_attention_mask",
        "decoder_attention_mask",
        "past_key_values",
        *_CONTROL,
    )

    @staticmethod
    def forward(model: Model, inputs: dict[str, Any], key: Any, hidden: bool) -> out.ModelOutput:
        """One batched forward pass of an encoder-decoder: encode, then decode the target."""
        if "decoder_input_ids" not in inputs:
            raise InputError("Make sure to provide both input_ids and decoder_input_ids: decoder_input_ids is missing")
        ids, dec = _ids(inputs["input_ids"], "input_ids"), _ids(inputs["decoder_input_ids"], "decoder_input_ids")
        mask = _ids(inputs.get("attention_mask", jnp.ones_like(ids)), "attention_mask")
        dec_mask = _ids(inputs.get("decoder_attention_mask", jnp.ones_like(dec)), "decoder_attention_mask")

        def one(arrays, key):
            ids, mask, dec, dec_mask = arrays
            k1, k2 = (None, None) if key is None else jax.random.split(key)
            with recording_hidden_states() as states:
                encoded = model.encode(ids, attention_mask=mask, key=k1)
                result = model.decode_full(dec, encoded, attention_mask=mask, decoder_attention_mask=dec_mask, key=k2)
            return encoded, result, states if hidden else []

        encoded, result, states = _batched(one, (ids, mask, dec, dec_mask), key)
        fields = {type(model).outputs[0]: result, "encoder_last_hidden_state": encoded}
        if hidden:
            fields["encoder_hidden_states"], fields["decoder_hidden_states"] = states
        return _base_output(model)(**fields)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """HF's `encode(input_ids, attention_mask=None, ...)`: a `FlaxBaseModelOutput`."""
        a = self._bind(self.encode_arguments, args, kwargs)
        inputs = {name: a[name] for name in ("input_ids", "attention_mask") if a[name] is not None}
        return self._run(type(self).encoder_pass, a, inputs)

    @staticmethod
    def encoder_pass(model: Model, inputs: dict[str, Any], key: Any, hidden: bool) -> out.ModelOutput:
        ids = _ids(inputs["input_ids"], "input_ids")
        mask = _ids(inputs.get("attention_mask", jnp.ones_like(ids)), "attention_mask")

        def one(arrays, key):
            with recording_hidden_states() as states:
                encoded = model.encode(arrays[0], attention_mask=arrays[1], key=key)
            return encoded, states if hidden else []

        encoded, states = _batched(one, (ids, mask), key)
        return out.FlaxBaseModelOutput(last_hidden_state=encoded, hidden_states=states[0] if hidden else None)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        """HF's `decode(decoder_input_ids, encoder_outputs, encoder_attention_mask=None,
        decoder_attention_mask=None, ...)`: the decoder over a whole target (no cache);
        `FlaxCausalLMOutputWithCrossAttentions` (logits) for LM heads, else
        `FlaxBaseModelOutputWithPastAndCrossAttentions`."""
        a = self._bind(self.decode_arguments, args, kwargs)
        if a["encoder_outputs"] is None or a["decoder_input_ids"] is None:
            raise InputError("decode needs decoder_input_ids and encoder_outputs (what encode returned)")
        inputs = {"encoded": jnp.asarray(a["encoder_outputs"][0])}
        for name in ("decoder_input_ids", "encoder_attention_mask", "decoder_attention_mask"):
            if a[name] is not None:
                inputs[name] = a[name]
        return self._run(type(self).decoder_pass, a, inputs)

    @staticmethod
    def decoder_pass(model: Model, inputs: dict[str, Any], key: Any, hidden: bool) -> out.ModelOutput:
        encoded = inputs["encoded"]
        dec = _ids(inputs["decoder_input_ids"], "decoder_input_ids")
        mask = _ids(
            inputs.get("encoder_attention_mask", jnp.ones(encoded.shape[:2], jnp.int32)), "encoder_attention_mask"
        )
        dec_mask = _ids(inputs.get("decoder_attention_mask", jnp.ones_like(dec)), "decoder_attention_mask")

        def one(arrays, key):
            dec, encoded, mask, dec_mask = arrays
            with recording_hidden_states() as states:
                result = model.decode_full(dec, encoded, attention_mask=mask, decoder_attention_mask=dec_mask, key=key)
            return result, states if hidden else []

        result, states = _batched(one, (dec, encoded, mask, dec_mask), key)
        states = states[0] if hidden else None
        if isinstance(model, Seq2SeqLM):
            return out.FlaxCausalLMOutputWithCrossAttentions(logits=result, hidden_states=states)
        return out.FlaxBaseModelOutputWithPastAndCrossAttentions(last_hidden_state=result, hidden_states=states)


# ---------------------------------------------------------------------- helpers


@eqx.filter_jit
def _apply(
    run: Any, model: Model, params: Any, key_map: KeyMap, train: bool, inputs: Any, key: Any, hidden: bool
) -> out.ModelOutput:
    """`run(model, inputs, key, hidden)` on `model` with HF's Flax `params` in place (when
    given) in training or inference mode: compiled once per shapes and options, and simply
    traced through when called inside the user's own `jit` or `grad`."""
    if params is not None:
        model = tree_from_flax(model, params, key_map)
    return run(eqx.nn.inference_mode(model, value=not train), inputs, key, hidden)


def _batched(one: Any, arrays: Any, key: Any) -> Any:
    """`one(example, key)` over the leading batch axis, one dropout key per example."""
    batch = jax.tree.leaves(arrays)[0].shape[0]
    keys = None if key is None else jax.random.split(key, batch)
    return jax.vmap(one)(arrays, keys)


def _base_output(model: Model) -> type[out.ModelOutput]:
    if model.task is not None:
        return TASK_OUTPUTS[model.task]
    if isinstance(model, EncoderDecoder):
        return out.FlaxSeq2SeqModelOutput
    if "pooler_output" in type(model).outputs:
        return out.FlaxBaseModelOutputWithPoolingAndCrossAttentions
    return out.FlaxBaseModelOutput


def _cast_floating(params: Any, dtype: Any, mask: Any) -> Any:
    def cast(leaf: Any, masked: bool = True) -> Any:
        if masked and isinstance(leaf, _ARRAYS) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf).astype(dtype)
        return leaf

    return jax.tree.map(cast, params) if mask is None else jax.tree.map(cast, params, mask)


def _max_length(config: GenerationConfig, kwargs: dict[str, Any], prompt: int, model_config: Config) -> int:
    """HF Flax's `max_length`: `max_new_tokens` plus the prompt if set; else an explicit
    `max_length`, or the default 20 counted after the prompt when `max_length=20` was
    passed or set (capped at `max_position_embeddings`); else 20 in total."""
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens) + prompt
    if kwargs.get("max_length") is None and config.max_length == 20:
        return 20
    if config.max_length == 20:
        limit = model_config.to_dict().get("max_position_embeddings")
        return min(20 + prompt, limit) if limit is not None else 20 + prompt
    return int(config.max_length)


def _search_options(config: GenerationConfig, new: int, eos: Any, pad: Any) -> dict[str, Any]:
    """`eqx_models.generate`'s options for an HF generation config."""
    options: dict[str, Any] = {
        "max_new_tokens": new,
        "do_sample": bool(config.do_sample),
        "num_beams": int(config.num_beams),
        "num_return_sequences": int(config.num_return_sequences),
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    if config.num_beams > 1:
        options["length_penalty"] = float(config.length_penalty)
        options["early_stopping"] = config.early_stopping
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            options["temperature"] = float(config.temperature)
        if config.top_k:
            options["top_k"] = int(config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            options["top_p"] = float(config.top_p)
        if config.min_p is not None:
            options["min_p"] = float(config.min_p)
    for name in ("min_length", "min_new_tokens", "no_repeat_ngram_size"):
        if getattr(config, name):
            options[name] = int(getattr(config, name))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        options["repetition_penalty"] = float(config.repetition_penalty)
    for name in ("bad_words_ids", "forced_bos_token_id", "forced_eos_token_id"):
        if getattr(config, name) is not None:
            options[name] = getattr(config, name)
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if getattr(config, name) is not None:
            options[name] = getattr(config, name)
    return options


def _hf_padding(sequences: Any, prompt: int, max_length: int, eos: Any, pad: int) -> Any:
    """HF Flax's output convention: the pad id after each row's first EOS among the new
    tokens, and pad columns up to `max_length`."""
    sequences = jnp.asarray(sequences)
    new = sequences[:, prompt:]
    if eos is not None:
        is_eos = jnp.isin(new, jnp.asarray(eos, jnp.int32).reshape(-1)).astype(jnp.int32)
        after = (jnp.cumsum(is_eos, axis=1) - is_eos) > 0
        new = jnp.where(after, pad, new)
    width = prompt + new.shape[1]
    filler = jnp.full((sequences.shape[0], max_length - width), pad, jnp.int32)
    return jnp.concatenate([sequences[:, :prompt].astype(jnp.int32), new.astype(jnp.int32), filler], axis=1)
