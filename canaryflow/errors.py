"""Every error canaryflow raises, in one tree.

    CanaryflowError                  base: a message that says what went wrong and what to do
    ├── ConfigError                  bad input from a user: fix the file or the flag, then rerun
    │   ├── ManifestError            a model manifest that does not validate
    │   ├── SpecError                a release spec that does not validate
    │   └── PolicyError              a gate policy that does not validate
    ├── SecurityError                refused before anything else happens
    │   ├── SignatureError           a manifest changed after signing, or a bad signature
    │   ├── UnknownKeyError          signed by a key that is not trusted
    │   └── WebhookSignatureError    a CI webhook whose HMAC does not match
    ├── CompatibilityError           candidate incompatible with the champion (tokenizer/embedding)
    ├── RegistryError                the model registry refused or is missing something
    │   └── AliasNotFound            no version carries that alias yet
    ├── ArtifactError                a manifest's artifact (adapter_uri) is missing or unreadable
    │   ├── ArtifactChanged          its bytes are not the ones the signature covers
    │   └── TransientArtifactError   its store did not answer (RetryableError)
    ├── ProviderError                an LLM provider answered badly
    │   ├── TransientProviderError   429, 5xx, timeouts: worth a retry (RetryableError)
    │   └── ProviderResponseError    garbage or a 4xx: a retry will not help
    ├── BudgetExceeded               a token or cost budget ran out: raise the budget or sample less
    ├── ReleaseBusy                  another release of the same service holds the lock
    └── StackError                   a running part (Envoy, a model service...) failed us
        ├── RoutesChanged            someone else moved the routes (a rollback): stop
        ├── RoutesBusy               the routes lock is held too long (RetryableError)
        └── RollbackUnconfirmed      stable-only routes are written, not yet confirmed live

Retryable errors derive from `RetryableError` too, so the Prefect layer can retry exactly those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from canaryflow.contracts import RouteChange


class CanaryflowError(Exception):
    """Base of every canaryflow error."""


class RetryableError(CanaryflowError):
    """Mixin root: the same call may succeed if tried again."""


class ConfigError(CanaryflowError):
    """Bad user input (file, flag or payload)."""


class ManifestError(ConfigError):
    pass


class SpecError(ConfigError):
    pass


class PolicyError(ConfigError):
    pass


class BelowFloor(PolicyError):
    """A spec asks for less than the service's policy floor; the message lists every field."""


class SecurityError(CanaryflowError):
    pass


class SignatureError(SecurityError):
    pass


class UnknownKeyError(SecurityError):
    pass


class WebhookSignatureError(SecurityError):
    pass


class CompatibilityError(CanaryflowError):
    pass


class RegistryError(CanaryflowError):
    pass


class TransientRegistryError(RegistryError, RetryableError):
    """The registry did not answer (connection refused, 5xx)."""


class AliasNotFound(RegistryError):
    pass


class ArtifactError(CanaryflowError):
    """The artifact a manifest names cannot be vouched for: missing, unreadable or unsigned."""


class ArtifactChanged(ArtifactError):
    """The artifact's size or sha256 differs from what the signed manifest says."""


class TransientArtifactError(ArtifactError, RetryableError):
    """The artifact's store (S3) did not answer; the same read may succeed later."""


class ProviderError(CanaryflowError):
    pass


class TransientProviderError(ProviderError, RetryableError):
    """429, 5xx or a timeout after the client's own retries were spent."""


class ProviderResponseError(ProviderError):
    """The provider answered with something we cannot use; retrying will not help."""


class BudgetExceeded(CanaryflowError):
    pass


class ReleaseBusy(CanaryflowError):
    pass


class StackError(CanaryflowError):
    pass


class RoutesChanged(StackError):
    """Refused before anything was written: the routes moved since the writer's basis.

    Either the caller's `expected_version` is stale (another writer wrote since), or a
    rollback this writer has not seen took traffic off a version this write would give traffic
    to again. Not retried: read the routes again and decide (a release stops).
    """


class RoutesBusy(StackError, RetryableError):
    """Another writer held the routes lock longer than this write may wait; worth a retry."""


class RollbackUnconfirmed(StackError):
    """A retreat's routes ARE written (the data plane's source of truth) and nothing was put
    back, but the data plane did not confirm them live before the deadline."""

    def __init__(self, message: str, *, change: RouteChange, version: int) -> None:
        super().__init__(message)
        self.change = change
        self.version = version
