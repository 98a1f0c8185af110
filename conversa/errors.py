"""One exception hierarchy for everything conversa raises, rooted at ConversaError."""

from __future__ import annotations


class ConversaError(Exception):
    """Base class of every error conversa raises."""


class InvalidMessage(ConversaError, ValueError):
    """A ChatMessage was built from values that break the message rules."""


class SessionBusy(ConversaError):
    """The session is in use elsewhere: another turn holds its lease past the wait."""


class StorageError(ConversaError):
    """A storage backend could not do what was asked."""


class InvalidSessionId(StorageError, ValueError):
    """A session id is empty, too long or holds control characters."""


class CorruptSessionError(StorageError):
    """Stored data of a session is damaged; it was left untouched."""


class StorageConfigError(StorageError, ValueError):
    """A storage was given settings it cannot use: a bad option, number or durability."""


class UnsupportedStorageURL(StorageConfigError):
    """open_storage() was given a URL it does not understand (a kind of StorageConfigError)."""


class StateValueError(StorageError, ValueError):
    """A state value or info field cannot be stored (not JSON-serialisable, bad status)."""


class EncryptionError(StorageError):
    """Encrypted storage met data it cannot handle (not encrypted), or a key problem below."""


class EncryptionKeyError(EncryptionError):
    """The encryption key is missing, malformed, or not the one the data was encrypted with."""


class FlowError(ConversaError, ValueError):
    """A flow change that cannot apply (a step or completion while in no route)."""


class BackendUnavailable(StorageError):
    """A backend's server cannot be reached, or its optional dependency is missing."""


class ModelError(ConversaError):
    """A model call failed after its retries; the message says what to check."""


class ModelNotConfigured(ModelError):
    """No model endpoint is configured and none answers on a usual local port."""


class ToolError(ConversaError):
    """A tool was defined or called in a way that cannot work."""


class ToolsUnsupported(ModelError):
    """The endpoint rejected the `tools` parameter; the text protocol can be used instead."""
