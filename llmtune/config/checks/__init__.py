"""The semantic checks of a parsed recipe, one module per section, called in order by
`llmtune.config.schema.check`: what needs the registries, the file system or this machine
(unknown names, missing files, incompatible options). Each function appends `key.path: message`
strings to the error list it is given, so the user sees every problem at once.

Nothing here imports torch, and nothing imports the schema at run time (the schema imports these
modules; the section types are only needed for annotations).
"""
