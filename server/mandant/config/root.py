""":class:`MandantConfig`, the whole file (``server``, ``limits``, ``tenants``,
``models``), and the checks that span its sections: tenant ids, key hashes and
certificate identities that clash, models that name unknown tenants or bases, versions
defined twice, version policies that disagree, warm-up requests that do not fit their
model's inputs; with what a running server asks of it: command-line server overrides,
a load request's model entries, warnings, the files it names and its model specs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError, model_validator

from mandant.config._base import _errors, _Frozen, _Problems, _unreadable
from mandant.config.models import ModelConfig, VersionPolicyConfig
from mandant.config.server import ServerConfig
from mandant.config.specs import ModelSpec, _bases, _inherited, _resolve, _version_policies
from mandant.config.tenants import LimitsConfig, TenantConfig
from mandant.errors import ConfigError
from mandant.heap import loads_untrusted


class MandantConfig(_Frozen):
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    tenants: tuple[TenantConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _references(self) -> MandantConfig:
        problems = [*_tenant_problems(self), *_model_problems(self.models, self.tenants)]
        if problems:
            raise _Problems(problems)
        return self

    def with_server(self, changes: Mapping[str, object]) -> MandantConfig:
        """This configuration with ``changes`` to its ``server`` settings (command-line
        flags), validated as the file's are; ConfigError with paths ``server.<field>…``."""
        data = {**self.server.model_dump(exclude_unset=True), **changes}
        try:
            server = ServerConfig.model_validate(data)
        except ValidationError as exc:
            errors = [
                (f"server.{path}".replace(".(top level)", ""), why) for path, why in _errors(exc)
            ]
            raise ConfigError("server settings", errors) from None
        return self.model_copy(update={"server": server})

    def warnings(self) -> list[tuple[str, str]]:
        """What validates but is likely a mistake, each (field path, reason). An empty
        file (no tenants, no models) was "ok" with no word."""
        keyless = "has no api_keys and no client_certs: no call can authenticate as it"
        found = [("tenants", "none configured: no tenant can call")] if not self.tenants else []
        found += [
            (f"tenants.{index}", f"tenant {tenant.id!r} {keyless}")
            for index, tenant in enumerate(self.tenants)
            if not tenant.api_keys and not tenant.client_certs
        ]
        server = self.server
        if server.front_door_slots >= server.max_concurrent_rpcs:
            # A lone tenant's share of the door is all of it: its calls can all be
            # inside, none waiting whose place another tenant's call could take.
            found.append(
                (
                    "server.front_door_slots",
                    f"{server.front_door_slots} is not below max_concurrent_rpcs "
                    f"({server.max_concurrent_rpcs}): one tenant's calls can take every "
                    "place under the cap, and the other tenants' calls are refused; keep "
                    "it well below (the defaults: 128 and 4096)",
                )
            )
        if not self.models:
            found.append(("models", "none configured: nothing to serve"))
        return found

    def resolved(self, base_dir: Path) -> MandantConfig:
        """This configuration with its server paths (``server.tls``) made absolute
        against ``base_dir``, the configuration file's directory."""
        tls = self.server.tls
        if tls is None:
            return self
        server = self.server.model_copy(update={"tls": tls.resolved(base_dir)})
        return self.model_copy(update={"server": server})

    def file_problems(self, base_dir: Path) -> list[tuple[str, str]]:
        """The files this configuration names that cannot be read, each (field path,
        reason): the TLS files, and each torch model's own ``path`` unless its
        ``weights_init`` builds it. Looks at the filesystem, which validation never
        does: for ``check-config`` and the start."""
        problems = self.server.tls.file_problems(base_dir) if self.server.tls else []
        shared = _bases(self.models)
        for index, model in enumerate(self.models):
            base = shared.get(model.base) if model.base else None
            backend = model.backend or (base.backend if base else None) or "torch"
            builds = model.weights_init or (base.weights_init if base else None)
            if model.path is None or backend != "torch" or builds is not None:
                continue
            why = _unreadable(base_dir / model.path)
            if why is not None:
                problems.append((f"models.{index}.path", why))
        return problems

    def callable_refs(self) -> list[tuple[str, str]]:
        """Each ``factory`` and ``weights_init`` a model entry sets, as (field path,
        ``module:callable``)."""
        return [
            (f"models.{index}.{field}", ref)
            for index, model in enumerate(self.models)
            for field in ("factory", "weights_init")
            if (ref := getattr(model, field)) is not None
        ]

    def model_specs(self, base_dir: Path) -> list[ModelSpec]:
        """Every model version to serve (as its model's ``version_policy`` says) with
        its base's settings filled in and paths made absolute against ``base_dir``;
        raises ConfigError where one is incomplete."""
        shared = _bases(self.models)
        policies = _version_policies(self.models)
        specs: list[ModelSpec] = []
        errors: list[tuple[str, str]] = []
        built: dict[Path, tuple[int, ModelSpec]] = {}  # a weights file: who builds it first
        for index, model in enumerate(self.models):
            base = shared.get(model.base) if model.base else None
            policy, served = policies[(model.tenant, model.model_name)]
            if model.version not in served:
                continue
            try:
                spec = _resolve(model, base, base_dir, policy)
            except ValueError as exc:
                errors.append((f"models.{index}", str(exc)))
                continue
            specs.append(spec)
            if spec.weights_init is not None and spec.path is not None:
                first, builder = built.setdefault(spec.path, (index, spec))
                if (builder.factory, builder.weights_init, builder.factory_args) != (
                    spec.factory,
                    spec.weights_init,
                    spec.factory_args,
                ):
                    errors.append((f"models.{index}.path", _SHARED_WEIGHTS.format(first=first)))
        if errors:
            raise ConfigError("configuration", errors)
        return specs

    def entry_specs(self, name: str, text: str, base_dir: Path) -> list[ModelSpec]:
        """Every model version to serve once a load's ``text`` replaced ``name``'s
        entries (:meth:`with_model_entries`); ConfigError if they do not validate, each
        error named by the request's own entry (``0.path``), not by where it lands in
        the whole configuration (``models.4``, which the client never sent)."""
        config = self.with_model_entries(name, text)
        kept = sum(m.model_name != name for m in self.models)
        try:
            return config.model_specs(base_dir)
        except ConfigError as exc:
            raise ConfigError(_LOAD_SOURCE, [_entry_path(e, kept) for e in exc.errors]) from None

    def with_model_entries(self, name: str, text: str) -> MandantConfig:
        """This configuration with model ``name``'s entries replaced by ``text``: a JSON
        model entry (the fields of one ``models:`` item) or a list of them (one per
        version), each naming ``name``. Validated like the file; ConfigError if not."""
        source = _LOAD_SOURCE
        try:
            data = loads_untrusted(text)
        except ValueError as exc:
            raise ConfigError(source, [("(json)", str(exc)[:200])]) from None
        except RecursionError:  # nested deeper than the parser goes
            raise ConfigError(source, [("(json)", "nested too deeply")]) from None
        entries = data if isinstance(data, list) else [data]
        if not entries or not all(isinstance(entry, dict) for entry in entries):
            raise ConfigError(source, [("(json)", "expected a model entry or a list of them")])
        for index, entry in enumerate(entries):
            if (entry.get("name") or entry.get("base")) != name:
                raise ConfigError(source, [(str(index), "the entry must name the model loaded")])
        kept = tuple(m for m in self.models if m.model_name != name)
        try:
            models = [ModelConfig.model_validate(entry) for entry in entries]
            return MandantConfig(
                server=self.server, limits=self.limits, tenants=self.tenants,
                models=(*kept, *models),
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError(source, [_entry_path(e, len(kept)) for e in _errors(exc)]) from None


_LOAD_SOURCE = "the load request's 'config'"
#: Two entries whose weights file one ``weights_init`` builds, from different factories
#: or arguments: the last build won, and one served the other's weights (a tuned
#: variant's inherited ``path`` and its own ``factory_args`` gave every tenant's shared
#: model the variant's weights, for good: the file stays).
_SHARED_WEIGHTS = (
    "the weights file it shares (also models.{first}) is built by weights_init from "
    "another factory or other factory_args: give it a 'path' of its own"
)


def _entry_path(error: tuple[str, str], kept: int) -> tuple[str, str]:
    """An error of the configuration a load request makes, ``models.N…`` of its own
    entries (after the ``kept`` ones) renamed as the request's ``N - kept…``, in its
    path and where its reason names another of them (``also models.N``)."""
    path, reason = error
    parts = path.split(".")
    if len(parts) > 1 and parts[0] == "models" and parts[1].isdigit() and int(parts[1]) >= kept:
        path = ".".join([str(int(parts[1]) - kept), *parts[2:]])
    reason = _ALSO.sub(
        lambda found: f"also {int(found[1]) - kept}" if int(found[1]) >= kept else found[0],
        reason,
    )
    return path, reason


#: Another entry named in a reason (``defined twice (also models.N)``).
_ALSO = re.compile(r"also models\.(\d+)")


def _tenant_problems(config: MandantConfig) -> list[tuple[str, str]]:
    """Tenant ids, key hashes and certificate identities that clash, each (field path,
    reason)."""
    problems: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    key_owner: dict[str, int] = {}
    identities: set[str] = set()
    admin_keys = set(config.server.admin_keys)
    for index, tenant in enumerate(config.tenants):
        where = f"tenants.{index}"
        if first.setdefault(tenant.id, index) != index:
            why = f"tenant ids must be unique: {tenant.id!r} is also tenants.{first[tenant.id]}"
            problems.append((f"{where}.id", why))
        for number, key in enumerate(tenant.api_keys):
            owner = key_owner.setdefault(key, index)
            if key in admin_keys:
                why = "an admin key hash is also a tenant's API key"
            elif number != tenant.api_keys.index(key):
                why = "an API key hash is listed twice"
            elif owner != index:
                why = f"an API key hash appears under two tenants (also tenants.{owner})"
            else:
                continue
            problems.append((f"{where}.api_keys.{number}", why))
        for number, identity in enumerate(tenant.client_certs):
            if identity in identities:
                why = "a client certificate identity appears twice"
                problems.append((f"{where}.client_certs.{number}", why))
            identities.add(identity)
    if identities and (config.server.tls is None or config.server.tls.client_ca is None):
        problems.append(("server.tls.client_ca", "tenants' client_certs need server.tls.client_ca"))
    return problems


def _model_problems(
    models: Sequence[ModelConfig], tenants: Sequence[TenantConfig]
) -> list[tuple[str, str]]:
    """Models that name an unknown tenant or base, versions defined twice, version
    policies that disagree, warm-up requests that do not fit the model's inputs,
    tenants' limits for unknown models; each (field path, reason)."""
    problems: list[tuple[str, str]] = []
    tenant_ids = {t.id for t in tenants}
    shared = {m.model_name for m in models if m.tenant is None}
    first: dict[tuple[str | None, str, str], int] = {}
    for index, model in enumerate(models):
        name, where = model.model_name, f"models.{index}"
        if model.tenant is not None and model.tenant not in tenant_ids:
            problems.append((f"{where}.tenant", f"model {name!r}: unknown tenant {model.tenant!r}"))
        key = (model.tenant, name, model.version)
        if first.setdefault(key, index) != index:
            owner = f" for tenant {model.tenant!r}" if model.tenant else ""
            why = f"model {name!r} version {model.version} is defined twice{owner}"
            problems.append((f"{where}.version", f"{why} (also models.{first[key]})"))
        if model.base is not None and model.base not in shared:
            why = f"model {name!r} of tenant {model.tenant!r}: base {model.base!r}"
            problems.append((f"{where}.base", f"{why} is not a shared model"))
    problems += _version_policy_problems(models)
    problems += _warmup_problems(models)
    for index, tenant in enumerate(tenants):
        for name in tenant.models:
            if not any(m.model_name == name and m.tenant in (None, tenant.id) for m in models):
                why = f"tenant {tenant.id!r}: limits for unknown model {name!r}"
                problems.append((f"tenants.{index}.models.{name[:64]}", why))
    return problems


def _version_policy_problems(models: Sequence[ModelConfig]) -> list[tuple[str, str]]:
    """The entries of one model agree on its policy; ``specific`` names configured
    versions. Each problem (field path, reason)."""
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[str | None, str], tuple[int, VersionPolicyConfig]] = {}
    for index, model in enumerate(models):
        policy = model.version_policy
        if policy is None:
            continue
        key = (model.tenant, model.model_name)
        if seen.setdefault(key, (index, policy))[1] != policy:
            why = f"model {model.model_name!r}: its entries set different version_policy"
            problems.append(
                (f"models.{index}.version_policy", f"{why} (see models.{seen[key][0]})")
            )
    for (tenant, name), (index, policy) in seen.items():
        configured = {int(m.version) for m in models if (m.tenant, m.model_name) == (tenant, name)}
        missing = sorted(set(policy.specific or ()) - configured)
        if missing:
            why = f"model {name!r}: version_policy names version {missing[0]}, which has no entry"
            problems.append((f"models.{index}.version_policy.specific", why))
    return problems


def _warmup_problems(models: Sequence[ModelConfig]) -> list[tuple[str, str]]:
    """Each warm-up request that does not give its model version the inputs it declares
    (both as the entry resolves: a tuned variant's from its base where it sets none).
    A model that declares none (Triton's may leave them to Triton) is not checked."""
    shared = _bases(models)
    problems: list[tuple[str, str]] = []
    for index, model in enumerate(models):
        base = shared.get(model.base) if model.base else None
        declared = _inherited(model, base, "inputs")
        warmup = _inherited(model, base, "warmup")
        if not declared or not warmup:
            continue
        source = "" if model.warmup is not None else f", in the warmup of its base {model.base!r}"
        problems += [
            (f"models.{index}.warmup.{number}.{path}", f"{why}{source}")
            for number, request in enumerate(warmup)
            for path, why in request.unfit(model.model_name, declared)
        ]
    return problems
