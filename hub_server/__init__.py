"""SpecEdge verification hub: verifies drafted tokens with the target model for many users."""
