"""Operations: the compose stack run as local processes (``harp-vllm stack``)."""
