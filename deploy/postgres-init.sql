-- One database per Baton service: services never share tables.
CREATE DATABASE baton_intake OWNER baton;
CREATE DATABASE baton_routing OWNER baton;
CREATE DATABASE baton_notifier OWNER baton;
CREATE DATABASE baton_metrics OWNER baton;
