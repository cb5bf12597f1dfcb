"""The graft rounds of N models trained together (PeerEnsemble, GraftTrainer) and the logs a round adds.

The models graft either in a ring (model k takes from model k - 1, :class:`keras_graft.RingGrafter`) or each from
its own copy of a peer source (a scion: ``source.for_member(k)``). Both log per model (``graft_alpha_k``...) and
merged over the models (``graft_alpha``...: alphas, spreads and distances averaged, counts summed).
"""

import numpy as np

from keras_graft import grafting


def merge_logs(results):
    """One set of graft logs for several GraftResults: alphas, spreads and distances averaged, counts summed."""
    return _merge([result.logs() for result in results])


def _merge(logs):
    if not logs:
        return {}
    merged = {}
    for entry in logs:
        for key, value in entry.items():
            merged.setdefault(key, []).append(value)
    mean_keys = {f"graft_{key}" for key in grafting.MEAN_KEYS}
    return {key: float(np.mean(values)) if key in mean_keys else int(np.sum(values))
            for key, values in merged.items()}


def member_logs(logs):
    """Logs of N models' rounds (one dict per model): per model (``graft_alpha_k``...) and merged."""
    merged = _merge(logs)
    for k, entry in enumerate(logs):
        merged.update({f"{key}_{k}": value for key, value in entry.items()})
    return merged


def ring_logs(results):
    """Logs of a ring round (one GraftResult per model): per model and merged over models."""
    return member_logs([result.logs() for result in results])


def idle_ring_logs(num_models, idle=None):
    """The logs of an epoch that no round opened: per model and merged, every key at its neutral value."""
    idle = grafting.idle_logs() if idle is None else idle
    return member_logs([idle] * num_models)


def round_summary(logs, suffix=""):
    """One line describing a round from its logs (keys ``graft_alpha{suffix}``, ...)."""
    line = (f"alpha {logs[f'graft_alpha{suffix}']:.3f}, |alpha - 0.5| {logs[f'graft_alpha_spread{suffix}']:.3f}, "
            f"peer distance {logs[f'graft_peer_distance{suffix}']:.3f}, {logs[f'graft_layers{suffix}']} layers")
    skipped = logs.get(f"graft_skipped_layers{suffix}", 0)
    if skipped:
        line += f", {skipped} skipped (non-finite peer weights)"
    if f"scion_filters{suffix}" in logs:
        line += f", {logs[f'scion_filters{suffix}']} scion filters"
    return line


class MemberRounds:
    """The rounds of ``models`` trained together, with the settings of a :class:`keras_graft.GraftConfig`.

    ``source`` None: a ring (at least 2 models; a model flagged unhealthy is not mixed into its successor).
    Otherwise a :class:`keras_graft.peers.PeerSource` that supports ``for_member`` (the scions): model k grafts
    from ``source.for_member(k)``, whose state is attached to model k now, before any checkpoint is restored.
    """

    def __init__(self, models, config, source=None):
        self.models = list(models)
        self.config = config
        if source is None:
            self.sources = None
            self._ring = config.ring(self.models)
            return
        if not getattr(source, "per_member", False):
            raise ValueError(f"{type(source).__name__} cannot graft the models of a GraftTrainer or PeerEnsemble "
                             "one by one: graft them in a ring (Grafting(peers=None)) or with a scion "
                             "(Grafting(keras_graft.NoiseScion()), Grafting(keras_graft.InternalScion())).")
        self.sources = [source.for_member(k) for k in range(len(self.models))]
        self._grafters = [config.grafter(model) for model in self.models]
        for member, model in zip(self.sources, self.models):
            member.track(model)
            member.setup(model)

    def idle_logs(self):
        """Logs of an epoch that no round opened."""
        idle = None if self.sources is None else self.sources[0].idle_logs()
        return idle_ring_logs(len(self.models), idle)

    def __call__(self, round_index, healthy=None):
        """Runs the round after (0-based) epoch ``round_index``; returns its logs."""
        if self.sources is None:
            return ring_logs(self._ring(healthy))
        return member_logs([merge_logs(member.graft_round(grafter, round_index))
                            for member, grafter in zip(self.sources, self._grafters)])
