"""A model tester (what transformers' generic mixins call `self.model_tester`) for tiny decoder-only MoE models,
written here: it builds a config from a class and keyword arguments and random inputs with an attention mask."""

from __future__ import annotations

import types


class TinyDecoderTester:
    """Tiny config + inputs for ModelTesterMixin: `prepare_config_and_inputs_for_common()` -> (config, inputs)."""

    def __init__(self, parent: object, common: types.ModuleType, config_class: type, config_kwargs: dict,
                 batch_size: int = 3, seq_length: int = 7, is_training: bool = True) -> None:
        self.parent, self.common = parent, common
        self.config_class, self.config_kwargs = config_class, dict(config_kwargs)
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.vocab_size = config_kwargs["vocab_size"]
        self.hidden_size = config_kwargs["hidden_size"]
        self.num_hidden_layers = config_kwargs["num_hidden_layers"]
        self.num_attention_heads = config_kwargs["num_attention_heads"]
        self.num_labels = config_kwargs.get("num_labels", 3)
        self.type_sequence_label_size = self.num_labels
        self.pad_token_id = config_kwargs.get("pad_token_id", 0)

    def get_config(self) -> object:
        return self.config_class(**self.config_kwargs)

    def prepare_config_and_inputs(self) -> tuple:
        # ids avoid the pad token (sequence classification reads the last non-pad token of each row)
        input_ids = self.common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        input_mask = self.common.random_attention_mask([self.batch_size, self.seq_length])  # last position kept
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self) -> tuple[object, dict]:
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}
