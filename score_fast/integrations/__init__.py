"""Optional bridges to other training libraries; each imports its library when imported
(score_fast itself never imports them)."""
