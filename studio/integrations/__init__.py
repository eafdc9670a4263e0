"""Plugging the studio's attention backends into the libraries' own models, through their public
plug-in points: transformers' AttentionInterface and AttentionMaskInterface, diffusers' attention
processors. Once wired, a model follows `backends.use(attention=...)` at run time, no reload.

Each submodule imports its library; import the one you need."""
