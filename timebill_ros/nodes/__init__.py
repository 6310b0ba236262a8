"""Thin rclpy adapters over timebill_ros.core (one node a file)."""
