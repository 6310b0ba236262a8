"""The target model's tokenizer without its weights (server and predictor encode prompts)."""

from __future__ import annotations

from types import SimpleNamespace

from timebill_ros.core.config import TimeBillConfig


class PromptTokenizer:
    """
    The target model's tokenizer and context size, without loading its weights.

    Encoding goes through ``Engine.encode`` so the chat template is applied exactly as the
    generator would apply it.
    """

    def __init__(self, cfg: TimeBillConfig):
        from timebill_ros.core.model import resolve_model_path
        from transformers import AutoConfig, AutoTokenizer

        target, extra = resolve_model_path(cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(target, **extra)
        mcfg = AutoConfig.from_pretrained(target, **extra)
        text = mcfg.get_text_config(decoder=True) if hasattr(mcfg, 'get_text_config') else mcfg
        self.max_context = int(getattr(text, 'max_position_embeddings', 0) or 2048)
        self._encoder = SimpleNamespace(tokenizer=self.tokenizer, chat_template=cfg.chat_template)

    def encode(self, prompt: str, system_prompt: str = '') -> list[int]:
        from timebill_ros.core.engine import Engine

        return Engine.encode(self._encoder, prompt, system_prompt or None)
