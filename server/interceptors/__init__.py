"""Server interceptors: observation (outermost), error mapping, deadline, authentication, rate limiting."""

from server.interceptors._wrap import FusedInterceptors
from server.interceptors.auth import AuthInterceptor
from server.interceptors.concurrency import ConcurrencyLimitInterceptor
from server.interceptors.deadline import DeadlineInterceptor
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.rate_limit import RateLimitInterceptor

__all__ = [
    "AuthInterceptor",
    "ConcurrencyLimitInterceptor",
    "DeadlineInterceptor",
    "ErrorMappingInterceptor",
    "FusedInterceptors",
    "RateLimitInterceptor",
]
