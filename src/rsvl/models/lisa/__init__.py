"""LISA-family language-guided segmentation (LISA, FSVLM): a chat model's ``[SEG]`` prompts
a SAM mask decoder."""
