"""Quantrol's two extensions to GuideLLM, registered in its registries on import (see fleet.py for why).

Imported in the process that plans the run and, through unpickling the backend, in each of GuideLLM's worker
processes; it imports GuideLLM at the top, so only fleet.py's `_register` imports it.
"""

from __future__ import annotations

from typing import Any, Literal

from guidellm.backends.backend import Backend
from guidellm.backends.openai.http import OpenAIHTTPBackend
from guidellm.scheduler.constraints.constraint import PydanticConstraintInitializer
from guidellm.scheduler.constraints.factory import ConstraintsInitializerFactory
from guidellm.scheduler.schemas import SchedulerUpdateAction
from guidellm.schemas.backends.backend import BackendArgs
from guidellm.schemas.backends.openai_http import OpenAIHTTPBackendArgs
from guidellm.schemas.benchmark import BenchmarkArgs, BenchmarkScenario
from guidellm.schemas.scheduler.constraints.args import ConstraintArgs
from pydantic import Field

from quantrol_worker.fleet_mix import FLEET_BACKEND, STOP, Mix, endpoint, shape


@BackendArgs.register(FLEET_BACKEND)
class FleetBackendArgs(OpenAIHTTPBackendArgs):
    kind: Literal["quantrol_fleet"] = Field(default="quantrol_fleet")  # type: ignore[assignment, unused-ignore]
    targets: list[str] = Field(default_factory=list, description="endpoints taken in turn; empty: `target`")
    slices: dict[str, str] = Field(default_factory=dict, description="the slice each prompt's client names")
    slice_header: str = Mix.slice_header
    sampled_temperature: float = Mix.sampled_temperature
    sampled_every: int = Mix.sampled_every
    unstreamed_every: int = Mix.unstreamed_every


@Backend.register(FLEET_BACKEND)
class FleetBackend(OpenAIHTTPBackend):
    """GuideLLM's HTTP backend, each request shaped by the fleet's mix: temperature, streaming, endpoint and the
    slice header decided per request (GuideLLM 0.8 sets them per run)."""

    _args: FleetBackendArgs

    def __init__(self, arguments: FleetBackendArgs) -> None:
        super().__init__(arguments)
        self._sent = 0  # per worker process: each process's share of the run follows the mix on its own
        self._mix = Mix(sampled_temperature=arguments.sampled_temperature, sampled_every=arguments.sampled_every,
                        unstreamed_every=arguments.unstreamed_every, slice_header=arguments.slice_header)

    async def _prepare_resolve_request(self, request: Any, history: Any = None) -> tuple[Any, Any, dict[str, Any]]:
        handler, arguments, kwargs = await super()._prepare_resolve_request(request, history)
        n, self._sent = self._sent, self._sent + 1
        temperature, streamed = shape(n, self._mix)
        body = kwargs["json"]
        body["temperature"] = temperature
        if not streamed:
            arguments.stream = False
            body.pop("stream", None)
            body.pop("stream_options", None)
        targets = self._args.targets or [self._args.target]
        kwargs["url"] = kwargs["url"].replace(self._args.target, targets[endpoint(n, self._mix, len(targets))], 1)
        slice_ = self._args.slices.get(str(body.get("prompt", "")))
        if slice_:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), self._mix.slice_header: slice_}
        return handler, arguments, kwargs


@ConstraintArgs.register("quantrol_until_stopped")
class UntilStoppedArgs(ConstraintArgs):
    kind: Literal["quantrol_until_stopped"] = Field(default="quantrol_until_stopped")


@ConstraintsInitializerFactory.register("quantrol_until_stopped")
class UntilStopped(PydanticConstraintInitializer):
    """Stops queueing and processing once the process was asked to stop (fleet.STOP), as `max_duration` does at
    its bound: GuideLLM then shuts its workers down and compiles what was measured."""

    type_: Literal["quantrol_until_stopped"] = "quantrol_until_stopped"
    args: UntilStoppedArgs = Field(default_factory=UntilStoppedArgs)

    def create_constraint(self, **_kwargs: Any) -> Any:
        return self.model_copy()

    def __call__(self, state: Any, request_info: Any) -> Any:
        stopped = STOP.is_set()
        return SchedulerUpdateAction(request_queuing="stop" if stopped else "continue",
                                     request_processing="stop_local" if stopped else "continue",
                                     stopping_scope=self.args.stopping_scope, metadata={"stopped": stopped})


BenchmarkArgs.reload_schema()
BenchmarkScenario.reload_schema()
