from pathlib import Path

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError


class Tokenizer:
    """A sentencepiece tokenizer.model, as shipped with the native checkpoints."""

    def __init__(self, model_path: Path | str):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise MistralError(f"tokenizer {str(model_path)!r} does not exist; a model folder holds tokenizer.model")
        self._model = SentencePieceProcessor()
        try:
            self._model.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise MistralError(f"{model_path} is not a sentencepiece model ({e})") from None
        assert self._model.vocab_size() == self._model.get_piece_size()

    @property
    def n_words(self) -> int:
        return self._model.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._model.bos_id()

    @property
    def eos_id(self) -> int:
        return self._model.eos_id()

    def encode(self, s: str, bos: bool = True) -> list[int]:
        ids = self._model.encode(s)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._model.decode(ids)
