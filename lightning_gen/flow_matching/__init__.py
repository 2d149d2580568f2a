"""Flow matching family: straight-path conditional flow matching, ODE samplers, exact likelihood."""

from lightning_gen.flow_matching.coupling import COUPLINGS, ot_pairing
from lightning_gen.flow_matching.module import FlowMatching
from lightning_gen.flow_matching.ode import SOLVERS, divergence, integrate, log_likelihood, network_evaluations

__all__ = ["COUPLINGS", "SOLVERS", "FlowMatching", "divergence", "integrate", "log_likelihood",
           "network_evaluations", "ot_pairing"]
