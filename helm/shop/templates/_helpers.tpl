{{- define "shop.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "shop.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "order") */}}
{{- define "shop.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shop.serviceAccountName" -}}
{{- default (include "shop.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "shop.secretName" -}}
{{- default (printf "%s-secrets" (include "shop.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "shop.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s-nats:4222" (include "shop.fullname" .) -}}
{{- else -}}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/* A password: the value given, else the one stored by an earlier release, else a new one. (dict "root" $ "key" "order-nats-password" "value" "...") */}}
{{- define "shop.password" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (printf "%s-secrets" (include "shop.fullname" .root)) -}}
{{- if .value -}}
{{- .value -}}
{{- else if and $existing (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 24 -}}
{{- end -}}
{{- end -}}

{{/* JetStream's sync_interval: the value given; else on one node "always" (an acknowledged event must survive the node losing power, since the service has then marked it published), and on a cluster the server's default, two minutes (an acknowledgement means a quorum holds the event). */}}
{{- define "shop.natsSyncInterval" -}}
{{- if .Values.nats.syncInterval -}}
{{- .Values.nats.syncInterval -}}
{{- else if eq (int .Values.nats.replicas) 1 -}}
always
{{- else -}}
2m
{{- end -}}
{{- end -}}

{{/* Replicas of every stream: the value given; else as many as the in-chart cluster has nodes (at most 3), 1 with an external NATS. */}}
{{- define "shop.streamReplicas" -}}
{{- $given := int .Values.nats.streamReplicas -}}
{{- if and .Values.nats.enabled (gt $given (int .Values.nats.replicas)) -}}
{{- fail (printf "nats.streamReplicas (%d) exceeds the in-chart cluster's %d nodes" $given (int .Values.nats.replicas)) -}}
{{- end -}}
{{- if $given -}}
{{- $given -}}
{{- else if .Values.nats.enabled -}}
{{- min 3 (int .Values.nats.replicas) -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* The streams a service's durable consumer (named after it) reads. */}}
{{- define "shop.consumedStreams" -}}
{{- $streams := dict "user" (list) "order" (list "USER" "INVENTORY" "PAYMENT") "inventory" (list "ORDER" "PAYMENT") "payment" (list "USER" "INVENTORY" "ORDER") -}}
{{- toJson (index $streams .) -}}
{{- end -}}

{{/* The most replicas of a service at once: its replicas, or its autoscaler's maximum, and one more while a rolling update surges. */}}
{{- define "shop.mostReplicas" -}}
{{- if .autoscaling.enabled -}}
{{- add1 (int .autoscaling.maxReplicas) -}}
{{- else -}}
{{- add1 (int .replicas) -}}
{{- end -}}
{{- end -}}

{{/* Refuses values whose services could open more PostgreSQL connections than postgresql.maxConnections leaves them: each replica holds its pool (dbPoolSize) and the outbox relay's two. */}}
{{- define "shop.checkConnectionBudget" -}}
{{- $total := 0 -}}
{{- $parts := list -}}
{{- range $name, $svc := .Values.services -}}
{{- $replicas := int (include "shop.mostReplicas" $svc) -}}
{{- $each := add (int $svc.dbPoolSize) 2 -}}
{{- $total = add $total (mul $replicas $each) -}}
{{- $parts = append $parts (printf "%s %d x %d" $name $replicas $each) -}}
{{- end -}}
{{- $budget := sub (int .Values.postgresql.maxConnections) (int .Values.postgresql.reservedConnections) -}}
{{- if gt $total $budget -}}
{{- fail (printf "the services may open %d PostgreSQL connections (%s: replicas, with autoscaling's maximum and a rolling update's surge, x (dbPoolSize + 2)), more than the %d that postgresql.maxConnections (%d) less reservedConnections (%d) leaves them: lower the replicas or dbPoolSize, or raise maxConnections" $total (join ", " $parts) $budget (int .Values.postgresql.maxConnections) (int .Values.postgresql.reservedConnections)) -}}
{{- end -}}
{{- end -}}

{{/* Where KEDA reads the consumers' backlog: the in-chart nodes' headless service (the scaler asks a stream's leader by its server name there), or the value given. */}}
{{- define "shop.natsMonitoringEndpoint" -}}
{{- if .Values.nats.monitoringEndpoint -}}
{{- .Values.nats.monitoringEndpoint -}}
{{- else if .Values.nats.enabled -}}
{{- printf "%s-nats-headless.%s.svc.cluster.local:8222" (include "shop.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- fail "nats.monitoringEndpoint: the monitoring endpoint (host:8222) of your NATS, for KEDA's scaler" -}}
{{- end -}}
{{- end -}}
