"""Built-in routers. Each is an async generator `route(request, cluster)` written only with the
public router API (engine handles' three calls, `cluster` helpers), so users can copy them."""

from .adaptive import adaptive
from .balanced_pd import balanced_pd
from .pd import pd
from .prefix_aware import prefix_aware
from .round_robin import round_robin

BUILTIN_ROUTERS = {
    "round_robin": round_robin,
    "pd": pd,
    "balanced_pd": balanced_pd,
    "prefix_aware": prefix_aware,
    "adaptive": adaptive,
}
