"""Blob stores: where instance bytes live. One Protocol, a filesystem and an S3 implementation."""

from dicomweb.blobs.base import BlobInfo, BlobNotFound, BlobStore, BlobStoreError

__all__ = ["BlobInfo", "BlobNotFound", "BlobStore", "BlobStoreError"]
