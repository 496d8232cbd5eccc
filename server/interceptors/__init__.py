"""Server interceptors: error mapping (outermost), then authentication."""

from server.interceptors.auth import AuthInterceptor
from server.interceptors.errors import ErrorMappingInterceptor

__all__ = ["AuthInterceptor", "ErrorMappingInterceptor"]
