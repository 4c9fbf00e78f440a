"""The three event sources: session-watch (the lease), campaign (the recipe) and
observe (who leads). Each only puts events on the elector's queue."""
