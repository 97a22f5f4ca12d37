"""``harp-vllm gateway``: an OpenAI-compatible A/B gateway in front of several vLLM servers.

Modules, one job each: ``config`` (settings, checked at start), ``schemas`` (request parsing),
``openai_errors`` (OpenAI-style errors), ``backend_state`` (connections, busy vs down,
background health), ``routing`` (model and alias routing), ``relay`` (metrics per request, SSE
parsing, capped reads), ``exchange`` (one request to one backend: its bookkeeping, streamed
response and failures), ``proxy`` (forwarding, shadow copies and reloads), ``app`` (HTTP routes),
``server`` (uvicorn with client connection guards), ``prometheus_metrics`` (its Prometheus
series). Importing this package does not import vLLM.
"""

from .app import create_app
from .config import GatewayConfig, build_config
from .prometheus_metrics import GatewayMetrics
from .proxy import Gateway
from .server import serve

__all__ = ["Gateway", "GatewayConfig", "GatewayMetrics", "build_config", "create_app", "serve"]
