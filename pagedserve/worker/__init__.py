"""Model runner side: persistent input batch, block tables, KV cache allocation."""
