"""From the store to live torch modules and diffusers pipelines."""
