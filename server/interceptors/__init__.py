"""Server interceptors: observation (outermost), error mapping, authentication, then rate limiting."""

from server.interceptors.auth import AuthInterceptor
from server.interceptors.errors import ErrorMappingInterceptor
from server.interceptors.rate_limit import RateLimitInterceptor

__all__ = ["AuthInterceptor", "ErrorMappingInterceptor", "RateLimitInterceptor"]
