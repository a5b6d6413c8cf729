"""Operations endpoints: liveness, readiness, Prometheus metrics, and the loaded model card."""

from __future__ import annotations

import gc
import json
import sys

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from service.api.deps import require_api_key
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 503 once the model runtime is dead (the process is about to exit and be restarted)."""
    state = request.app.state
    runtime = state.runtime
    if state.runtime_dead or (runtime is not None and not runtime.health.alive):
        reason = state.runtime_dead or runtime.health.dead_reason
        return JSONResponse({"status": "dead", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: 200 only between a finished warm-up and the start of shutdown."""
    state = request.app.state
    if not state.ready:
        phase = "shutting down" if state.shutting_down else "starting"
        return JSONResponse({"status": phase}, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "sessions": len(state.registry),
            "max_sessions": state.settings.max_sessions,
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = request.app.state
    if state.scheduler is not None:
        state.metrics.queue_depth.set(state.scheduler.queue_depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(request: Request) -> JSONResponse:
    """The loaded model: its card as stored in the ONNX metadata, plus how this server runs it."""
    state = request.app.state
    runtime = state.runtime
    if runtime is None:
        return JSONResponse({"detail": "model not loaded yet"}, status_code=503)
    serving = state.serving
    return JSONResponse(
        {
            "data": [
                {
                    "id": runtime.card.name,
                    "card": json.loads(runtime.card.to_json()),
                    "provider": runtime.provider,
                    "mode": serving.mode,
                    "window_steps": serving.window_steps,
                    "hop_steps": serving.hop_steps,
                    "input_kinds": list(serving.input_kinds),
                    "batch_buckets": state.scheduler.buckets if state.scheduler else [],
                    "threads": {
                        "intra_op": state.settings.intra_op_threads,
                        "intra_op_spinning": state.settings.intra_op_spinning,
                        "gil_switch_interval_ms": round(sys.getswitchinterval() * 1000, 6),
                        "gc_threshold": list(gc.get_threshold()),
                    },
                    "websocket": {
                        "implementation": state.settings.ws_protocol,
                        "compression": state.settings.ws_compression,
                    },
                }
            ]
        }
    )
