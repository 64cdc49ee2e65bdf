"""Exception types. Each names the problem in its message; the server maps them to HTTP codes."""


class TokenmillError(Exception):
    """Base of every error tokenmill raises on purpose."""


class ConfigError(TokenmillError, ValueError):
    """An engine or model configuration value is invalid."""


class InvalidRequestError(TokenmillError, ValueError):
    """A request (prompt or sampling parameters) is invalid; other requests are unaffected."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus max_tokens exceed the model's context window."""


class ModelLoadError(TokenmillError):
    """A model file or folder cannot be loaded (missing, truncated, unsupported)."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or a tensor format is not supported."""


class EngineOverloadedError(TokenmillError):
    """The waiting queue is full; the caller should retry later."""


class SloUnattainableError(EngineOverloadedError):
    """The request's latency targets cannot be met now (the server answers 429 with
    Retry-After); `reason` names the target (ttft, tpot) or the limit (capacity)."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason
