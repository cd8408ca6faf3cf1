"""data_tools: from a folder of videos and captions to pre-encoded webdataset shards; arrives with the data issue."""
