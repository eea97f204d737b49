"""Influence methods (strategies) behind one interface: DataInf, Exact, LiSSA, Hessian-free, Diagonal, K-FAC, EK-FAC.

How to add one: see :mod:`datainf.methods.base` (one file here, one :func:`register_method`).
"""

from datainf.methods.base import (
    FusedPass,
    InfluenceMethod,
    MethodContext,
    Preconditioned,
    SelfInfluence,
    available_methods,
    check_method_names,
    get_method,
    register_method,
    unknown_methods,
    unregister_method,
)
from datainf.methods.datainf_method import DataInf
from datainf.methods.diagonal import Diagonal
from datainf.methods.exact import Exact
from datainf.methods.hessian_free import HessianFree
from datainf.methods.kfac import EKFAC, KFAC
from datainf.methods.lissa import Lissa, LissaDivergenceWarning

__all__ = [
    "FusedPass",
    "InfluenceMethod",
    "MethodContext",
    "Preconditioned",
    "SelfInfluence",
    "available_methods",
    "check_method_names",
    "get_method",
    "register_method",
    "unknown_methods",
    "unregister_method",
    "DataInf",
    "Diagonal",
    "Exact",
    "HessianFree",
    "KFAC",
    "EKFAC",
    "Lissa",
    "LissaDivergenceWarning",
]
