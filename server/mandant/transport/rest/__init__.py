"""KServe v2 REST (Triton's HTTP/REST protocol and its binary-data extension)."""
