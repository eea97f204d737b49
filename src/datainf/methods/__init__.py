"""Influence methods (strategies): DataInf, Exact, LiSSA and Hessian-free, behind one interface."""

from datainf.methods.base import InfluenceMethod, MethodContext, Preconditioned, available_methods, get_method, register_method
from datainf.methods.datainf_method import DataInf
from datainf.methods.exact import Exact
from datainf.methods.hessian_free import HessianFree
from datainf.methods.lissa import Lissa, LissaDivergenceWarning

__all__ = [
    "InfluenceMethod",
    "MethodContext",
    "Preconditioned",
    "available_methods",
    "get_method",
    "register_method",
    "DataInf",
    "Exact",
    "HessianFree",
    "Lissa",
    "LissaDivergenceWarning",
]
