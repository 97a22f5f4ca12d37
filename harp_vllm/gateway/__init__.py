"""``harp-vllm gateway``: an OpenAI-compatible A/B gateway in front of several vLLM servers.

See ``harp_vllm.gateway.app`` for the routes and behaviour, ``.config`` for the configuration
and ``.metrics`` for the Prometheus series. Importing this package does not import vLLM.
"""

from .app import Gateway, create_app, serve
from .config import GatewayConfig, build_config
from .metrics import GatewayMetrics

__all__ = ["Gateway", "GatewayConfig", "GatewayMetrics", "build_config", "create_app", "serve"]
